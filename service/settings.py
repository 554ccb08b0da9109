"""`deepserve serve` options, typed: one `Settings` dataclass is both the list of flags (each field's metadata holds
its help) and what the server reads. Every flag can also come from the environment as DEEPSERVE_<FLAG> (containers
and Kubernetes set env vars more easily than arguments). An env value goes through the same type and choice checks
as the flag (a bad one is a usage error naming the variable, exit 2), and a flag on the command line wins: a list
given on the command line (--load-model) replaces the env's list instead of adding to it."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields

from service.trace_settings import parse_config

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def opt(default, help: str, **kw):
    """A flag: its default, help and any argparse extras (choices)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Settings:
    repository: str = opt("models", "model repository folder (Triton layout)")
    host: str = opt("0.0.0.0", "address to bind, gRPC, HTTP and metrics")
    grpc_port: int = opt(8001, "gRPC port (inference, health, reflection)")
    http_port: int = opt(8000, "HTTP/REST port (KServe V2 / Triton HTTP API; 0 disables), same host, TLS and tokens "
                         "as gRPC")
    console: bool = opt(True, "serve the web console at / on the HTTP port (a page that calls the REST API, with "
                        "its TLS and tokens)")
    metrics_port: int = opt(8002, "Prometheus /metrics port (0 disables)")
    log_format: str = opt("text", "log format", choices=["text", "json"])
    log_level: str = opt("info", "log level", choices=["debug", "info", "warning", "error"])
    access_log: bool = opt(False, "log one line per inference request (model, version, status, duration)")
    model_control_mode: str = opt("none", "none: load all at start; poll: also rescan the repository; explicit: "
                                  "load only --load-model and the repository RPCs; lazy: scan at start, load each "
                                  "model on its first request", choices=["none", "poll", "explicit", "lazy"])
    repository_poll_secs: float = opt(15.0, "rescan interval in poll mode")
    load_model: list[str] = opt([], "model to load at start in explicit mode (repeatable; '*' for all)")
    max_loaded_models: int = opt(0, "lazy or explicit mode: most models in memory at once; a load beyond it first "
                                 "unloads the least recently used idle models (0: no limit)")
    max_loaded_bytes: int = opt(0, "lazy or explicit mode: most bytes of model files (on disk) in memory at once, "
                                "enforced as --max-loaded-models is (0: no limit)")
    strict_readiness: bool = opt(True, "ServerReady (and health) only when every model that should load is ready")
    event_loop: str = opt("uvloop", "asyncio event loop: uvloop (libuv's, the default: about a fifth less CPU per "
                          "request) or asyncio (the standard library's)", choices=["uvloop", "asyncio"])
    workers: int = opt(1, "server processes sharing the gRPC and HTTP ports (SO_REUSEPORT): one event loop per "
                       "core; metrics and statistics cover all of them; not with --model-control-mode explicit")
    reuse_port: bool = opt(False, argparse.SUPPRESS)  # set by the supervisor
    max_inflight: int = opt(2048, "server-wide limit of inference requests in flight; beyond it UNAVAILABLE at once")
    max_message_bytes: int = opt(64 * 1024 * 1024, "largest gRPC message or HTTP body accepted or sent")
    max_elements: int = opt(1 << 26, "largest number of elements in one request (all its inputs), checked before "
                            "allocation")
    shutdown_grace_secs: float = opt(0.0, "after SIGTERM, keep accepting new requests this long (health already "
                                     "NOT_SERVING), so load balancers can stop routing here")
    drain_secs: float = opt(30.0, "after SIGTERM, wait at most this long for accepted requests to finish")
    auth_token_file: str = opt("", "file with accepted bearer tokens, one per line; enables token auth (gRPC and "
                               "HTTP)")
    open_health: bool = opt(True, "with token auth, leave health checks open (Kubernetes probes send no token)")
    tls_cert: str = opt("", "PEM certificate chain; enables TLS (gRPC and HTTP)")
    tls_key: str = opt("", "PEM private key for --tls-cert")
    tls_ca: str = opt("", "PEM CA bundle; clients must present a certificate it signed (mutual TLS)")
    allow_shared_memory: bool = opt(False, "let clients register system shared memory regions (POSIX shm objects "
                                    "on this host) that inputs are read from and outputs written into; off: the "
                                    "shared memory calls answer UNAVAILABLE")
    trace_config: list[str] = opt([], "OpenTelemetry tracing, Triton's syntax (repeatable): mode=opentelemetry, "
                                  "rate=N (one request in N), count=N, level=TIMESTAMPS|TENSORS|OFF, "
                                  "opentelemetry,url=URL (OTLP/HTTP), opentelemetry,resource=KEY=VALUE, "
                                  "opentelemetry,bsp_schedule_delay=MS; OTEL_* variables work as the SDK reads them")

    @property
    def explicit_control(self) -> bool:
        return self.model_control_mode == "explicit"


def env_name(dest: str) -> str:
    return f"DEEPSERVE_{dest.upper()}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepserve serve", description="Serve a model repository over gRPC and "
                                "HTTP/REST (Open Inference Protocol / Triton) with onnxruntime. Each flag is also an "
                                "environment variable DEEPSERVE_<FLAG>, e.g. DEEPSERVE_GRPC_PORT (lists "
                                "comma-separated); the command line wins.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Settings):
        kw = dict(f.metadata)
        default = f.default_factory() if f.default is MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        if f.name == "reuse_port":
            kw["action"] = "store_true"
        elif isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw["action"] = "append"
        else:
            kw["type"] = type(default)
        p.add_argument(flag, dest=f.name, default=default, **kw)
    return p


def parse(argv: list[str]) -> Settings:
    p = parser()
    args = p.parse_args(argv)
    given = _given(argv)
    for action in p._actions:
        if action.dest in given or argparse.SUPPRESS in (action.default, action.help):  # -h, --reuse-port
            continue
        value = os.environ.get(env_name(action.dest))
        if value is not None:
            setattr(args, action.dest, _from_env(p, action, value))
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        p.error("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
    if (args.max_loaded_models or args.max_loaded_bytes) and args.model_control_mode not in ("lazy", "explicit"):
        p.error("--max-loaded-models / --max-loaded-bytes need --model-control-mode lazy or explicit (the modes "
                "that load on demand or by request); in none or poll mode every model loads")
    if args.max_loaded_models < 0 or args.max_loaded_bytes < 0:
        p.error("--max-loaded-models and --max-loaded-bytes must be >= 0 (0: no limit)")
    try:
        parse_config(args.trace_config)
    except ValueError as exc:
        p.error(f"--trace-config: {exc}")
    if args.workers > 1 and args.model_control_mode == "explicit":
        p.error("--workers > 1 cannot be combined with --model-control-mode explicit: a load or unload call reaches "
                "only the one worker that answers it, so workers would serve different models; use one worker, or "
                "poll mode (every worker rescans the repository)")
    if args.workers > 1 and args.allow_shared_memory:
        p.error("--workers > 1 cannot be combined with --allow-shared-memory: a region registered with one worker "
                "is unknown to the others, so a request would fail on whichever worker answers it")
    return Settings(**vars(args))


def _given(argv: list[str]) -> set[str]:
    """The options on the command line: parsed again with no defaults, so only what was given is set."""
    p = parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def _from_env(p: argparse.ArgumentParser, action: argparse.Action, value: str):
    """Convert and check an env value as argparse would the flag's, or stop with a usage error naming it."""
    where = f"{env_name(action.dest)}={value!r} (for {action.option_strings[0]})"
    if isinstance(action, argparse.BooleanOptionalAction):
        if value.lower() not in _TRUE + _FALSE:
            p.error(f"{where}: expected one of {', '.join(_TRUE)} / {', '.join(_FALSE[:-1])}")
        return value.lower() in _TRUE
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(action.default, list) else [value]
    out = []
    for item in items:
        try:
            v = action.type(item) if action.type else item
        except (TypeError, ValueError):
            p.error(f"{where}: invalid {getattr(action.type, '__name__', 'value')} value: {item!r}")
        if action.choices is not None and v not in action.choices:
            p.error(f"{where}: invalid choice: {item!r} (choose from {', '.join(map(repr, action.choices))})")
        out.append(v)
    return out if isinstance(action.default, list) else out[0]
