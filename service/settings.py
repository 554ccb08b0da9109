"""`deepserve serve` options. Every flag can also come from the environment as DEEPSERVE_<FLAG> (containers and
Kubernetes set env vars more easily than arguments). An env value goes through the same type and choice checks as
the flag (a bad one is a usage error naming the variable, exit 2), and a flag on the command line wins: a list given
on the command line (--load-model) replaces the env's list instead of adding to it."""

from __future__ import annotations

import argparse
import os

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_name(dest: str) -> str:
    return f"DEEPSERVE_{dest.upper()}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepserve serve", description="Serve a model repository over gRPC "
                                "and HTTP/REST (Open Inference Protocol / Triton) with onnxruntime. Each flag is also an "
                                "environment variable DEEPSERVE_<FLAG>, e.g. DEEPSERVE_GRPC_PORT (lists "
                                "comma-separated); the command line wins.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(flag: str, default, help: str, **kw) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        if isinstance(default, bool):
            kw.setdefault("action", argparse.BooleanOptionalAction)
        elif isinstance(default, list):
            kw.setdefault("action", "append")
        elif default is not None:
            kw.setdefault("type", type(default))
        p.add_argument(flag, dest=dest, default=default, help=help, **kw)

    add("--repository", "models", "model repository folder (Triton layout)")
    add("--host", "0.0.0.0", "address to bind, gRPC, HTTP and metrics")
    add("--grpc-port", 8001, "gRPC port (inference, health, reflection)")
    add("--http-port", 8000, "HTTP/REST port (KServe V2 / Triton HTTP API; 0 disables), same host and TLS as gRPC")
    add("--metrics-port", 8002, "Prometheus /metrics port (0 disables)")
    add("--log-format", "text", "log format", choices=["text", "json"])
    add("--log-level", "info", "log level", choices=["debug", "info", "warning", "error"])
    add("--access-log", False, "log one line per inference request (model, version, status, duration)")
    add("--model-control-mode", "none", "none: load all at start; poll: also rescan the repository; explicit: "
        "load only --load-model and the repository RPCs", choices=["none", "poll", "explicit"])
    add("--repository-poll-secs", 15.0, "rescan interval in poll mode")
    add("--load-model", [], "model to load at start in explicit mode (repeatable; '*' for all)")
    add("--strict-readiness", True, "ServerReady (and health) only when every model that should load is ready")
    add("--workers", 1, "server processes sharing the gRPC port (SO_REUSEPORT): one event loop per core; "
        "metrics and statistics cover all of them; not with --model-control-mode explicit")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set by the supervisor
    add("--max-inflight", 2048, "server-wide limit of inference requests in flight; beyond it UNAVAILABLE at once")
    add("--max-message-bytes", 64 * 1024 * 1024, "largest gRPC message accepted or sent")
    add("--max-elements", 1 << 26, "largest number of elements in one request (all its inputs), checked before "
        "allocation")
    add("--shutdown-grace-secs", 0.0, "after SIGTERM, keep accepting new requests this long (health already "
        "NOT_SERVING), so load balancers can stop routing here")
    add("--drain-secs", 30.0, "after SIGTERM, wait at most this long for accepted requests to finish")
    add("--auth-token-file", "", "file with accepted bearer tokens, one per line; enables token auth")
    add("--open-health", True, "with token auth, leave gRPC health checks open (Kubernetes probes send no token)")
    add("--tls-cert", "", "PEM certificate chain; enables TLS")
    add("--tls-key", "", "PEM private key for --tls-cert")
    add("--tls-ca", "", "PEM CA bundle; clients must present a certificate it signed (mutual TLS)")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
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
    if args.workers > 1 and args.model_control_mode == "explicit":
        p.error("--workers > 1 cannot be combined with --model-control-mode explicit: a load or unload call reaches "
                "only the one worker that answers it, so workers would serve different models; use one worker, or "
                "poll mode (every worker rescans the repository)")
    return args


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
