"""`deepserve serve` options. Every flag can also come from the environment as DEEPSERVE_<FLAG> (containers and
Kubernetes set env vars more easily than arguments); a flag on the command line wins."""

from __future__ import annotations

import argparse
import os


def _env(dest: str, default):
    value = os.environ.get(f"DEEPSERVE_{dest.upper()}")
    if value is None:
        return default
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, list):
        return [v for v in value.split(",") if v]
    return type(default)(value) if default is not None else value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepserve serve", description="Serve a model repository over gRPC "
                                "(Open Inference Protocol / Triton) with onnxruntime. Each flag is also an "
                                "environment variable DEEPSERVE_<FLAG>, e.g. DEEPSERVE_GRPC_PORT.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(flag: str, default, help: str, **kw) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        if isinstance(default, bool):
            kw.setdefault("action", argparse.BooleanOptionalAction)
        elif isinstance(default, list):
            kw.setdefault("action", "append")
        elif default is not None:
            kw.setdefault("type", type(default))
        p.add_argument(flag, dest=dest, default=_env(dest, default), help=help, **kw)

    add("--repository", "models", "model repository folder (Triton layout)")
    add("--host", "0.0.0.0", "address to bind, gRPC and metrics")
    add("--grpc-port", 8001, "gRPC port (inference, health, reflection)")
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
        "metrics and statistics cover all of them")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set by the supervisor
    add("--max-inflight", 2048, "server-wide limit of inference requests in flight; beyond it UNAVAILABLE at once")
    add("--max-message-bytes", 64 * 1024 * 1024, "largest gRPC message accepted or sent")
    add("--max-elements", 1 << 26, "largest number of elements in one input tensor, checked before allocation")
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
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        p.error("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
    return args
