"""The `deepserve` command. Each subcommand imports its module lazily, so `deepserve serve` never loads torch
and `deepserve train` never loads grpc."""

from __future__ import annotations

import sys

USAGE = """usage: deepserve COMMAND [ARGS]

commands:
  train    train, export, check and publish a model (needs the `train` extra)
  serve    serve a model repository over gRPC and HTTP/REST (Open Inference Protocol)
  infer    send a request to a running server and print the outputs
  generate stream a generation model's text to the terminal
  health   gRPC health check of a running server (exit 0 when serving)
  bench    benchmark the server against its transport and compute ceilings

`deepserve COMMAND --help` for each command's options."""

COMMANDS = {
    "train": "training.cli",
    "serve": "service.server",
    "infer": "service.client",
    "generate": "service.client",
    "health": "service.client",
    "bench": "bench.harness",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"deepserve: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    import importlib

    try:
        module = importlib.import_module(COMMANDS[command])
    except ImportError as exc:
        print(f"deepserve {command}: {exc}. Is the right extra installed (pip install 'deepserve[train]')?",
              file=sys.stderr)
        return 2
    return int(getattr(module, f"{command}_main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
