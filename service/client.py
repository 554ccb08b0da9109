"""`deepserve infer` and `deepserve health`: small clients for people and for probes, over gRPC (our own stubs) or
HTTP/REST (the standard library, binary tensor extension), chosen by the URL: `http://` or `https://` is HTTP,
anything else a gRPC target."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from service.tensors import BY_WIRE, BYTES, decode_bytes
from service.transport import GrpcTransport, HttpTransport, RequestFailed, Transport


def decode_output(tensor, raw: bytes) -> np.ndarray:
    """One output of a gRPC ModelInferResponse as numpy."""
    dt = BY_WIRE[tensor.datatype]
    shape = tuple(tensor.shape)
    if dt is BYTES:
        return decode_bytes(raw, int(np.prod(shape)), tensor.name).reshape(shape)
    return np.frombuffer(raw, dtype=dt.numpy).reshape(shape)


def connect(url: str, token: str = "", tls_ca: str = "", timeout: float = 30.0) -> Transport:
    if url.startswith(("http://", "https://")):
        return HttpTransport(url, token, tls_ca, timeout)
    return GrpcTransport(url, token, tls_ca, timeout)


def _examples(repository: Path, model: str, version: str) -> Path:
    model_dir = repository / model
    versions = sorted((int(p.name) for p in model_dir.glob("[0-9]*") if (p / "examples.npz").is_file()),
                      reverse=True)
    if version:
        versions = [int(version)] if int(version) in versions else []
    if not versions:
        raise SystemExit(f"no examples.npz for {model} under {model_dir} (published by `deepserve train`)")
    return model_dir / str(versions[0]) / "examples.npz"


def _feeds(args, md: dict) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if args.label is not None:  # a conditional generator: z ~ N(0, 1) and the label asked for, --count samples
        specs = {t["name"]: t for t in md["inputs"]}
        if set(specs) != {"z", "label"}:
            raise SystemExit(f"--label is for generators with inputs z and label; {args.model} has {', '.join(specs)}")
        latent = specs["z"]["shape"][-1]
        z = np.random.default_rng(args.seed).standard_normal((args.count, latent)).astype(np.float32)
        return {"z": z, "label": np.full(args.count, args.label, np.int64)}, None
    if args.examples:
        data = np.load(_examples(Path(args.repository), args.model, args.version), allow_pickle=False)
        return {t["name"]: data[t["name"]] for t in md["inputs"] if t["name"] in data}, data.get("label")
    if args.text:
        text_inputs = [t["name"] for t in md["inputs"] if t["datatype"] == "BYTES"]
        if not text_inputs:
            raise SystemExit(f"model {args.model} has no text (BYTES) input")
        return {text_inputs[0]: np.array([t.encode() for t in args.text], dtype=object)}, None
    feeds = {}
    for item in args.input:
        name, _, path = item.partition("=")
        feeds[name] = np.load(path, allow_pickle=False)
    return feeds, None


def infer_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="deepserve infer", description="Send one inference request and print the "
                                "outputs.")
    p.add_argument("model")
    p.add_argument("--version", default="")
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port, or http(s)://host:port for HTTP/REST")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input from a .npy")
    p.add_argument("--examples", action="store_true", help="send the model's published examples.npz and compare "
                   "the predictions with the true labels")
    p.add_argument("--text", action="append", default=[], help="raw text for a model with a text input "
                   "(repeatable: one sample each)")
    p.add_argument("--repository", default="models", help="where --examples looks for examples.npz")
    p.add_argument("--top", type=int, default=3, help="classes to show per sample for classifiers")
    p.add_argument("--label", type=int, default=None, help="a conditional generator (digits_gan, digits_vae): "
                   "draw samples of this class")
    p.add_argument("--count", type=int, default=16, help="samples to draw with --label")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent draws with --label")
    p.add_argument("--png", default="", help="write an image output (e.g. a generator's samples) as one PNG grid")
    p.add_argument("--token", default="", help="bearer token for a server started with --auth-token-file")
    p.add_argument("--tls-ca", default="", help="CA bundle to verify a TLS server")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    client = connect(args.url, args.token, args.tls_ca, args.timeout)
    try:
        md = client.metadata(args.model, args.version)
        feeds, labels = _feeds(args, md)
        if not feeds:
            raise SystemExit("nothing to send: give --input NAME=FILE.npy or --examples")
        out_names = [t["name"] for t in md["outputs"]]
        served, results = client.infer(args.model, args.version, feeds, md)
        top = None
        if "probabilities" in out_names and args.top:
            _, ranked = client.infer(args.model, args.version, feeds, md, {"probabilities": args.top})
            top = ranked["probabilities"]
    except RequestFailed as exc:
        print(f"deepserve infer: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"{args.model} version {served}")
    if args.png:
        from service.images import grid_png

        images = [a for a in results.values() if a.ndim == 4 and a.shape[1] == 1 and a.dtype != object]
        if not images:
            raise SystemExit(f"--png: {args.model} has no image output ([N, 1, H, W])")
        grid_png(images[0], args.png)
        print(f"  wrote {len(images[0])} images to {args.png}")
    for name, arr in results.items():
        print(f"  {name} {arr.dtype} {list(arr.shape)}")
    if top is not None:
        predicted = np.argmax(results["probabilities"], axis=-1)
        for i, row in enumerate(top):
            shown = "  ".join(c.decode() if isinstance(c, bytes) else str(c) for c in row)
            truth = f"  true {labels[i]}" + (" ok" if labels[i] == predicted[i] else " WRONG") \
                if labels is not None else ""
            sample = f" {args.text[i]!r}:" if args.text else ""
            print(f"  [{i}]{sample} {shown}{truth}")
        if labels is not None:
            print(f"accuracy on these examples: {np.mean(predicted == labels):.1%}")
    else:
        with np.printoptions(precision=4, suppress=True, threshold=40):
            for name, arr in results.items():
                print(f"{name} = {arr}")
        if labels is not None and "anomaly_score" in results:
            print(f"true labels (1 = anomaly): {labels}")
    return 0


def health_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="deepserve health", description="Health check, exit 0 when serving, 1 "
                                "otherwise. gRPC: grpc.health.v1 (SERVING); HTTP: /v2/health/ready, "
                                "/v2/health/live or /v2/models/{service}/ready. For container HEALTHCHECKs.")
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC host:port, or http(s)://host:port for HTTP/REST")
    p.add_argument("--service", default="", help="'' for the server, a model name for one model, 'liveness'")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--tls-ca", default="")
    p.add_argument("--token", default="", help="bearer token (HTTP health needs one only with --no-open-health)")
    args = p.parse_args(argv)
    client = connect(args.url, args.token, args.tls_ca, args.timeout)
    try:
        status, ok = client.health(args.service)
    except RequestFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        client.close()
    print(status)
    return 0 if ok else 1


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="deepserve generate", description="Stream a generation model's text to the "
                                "terminal (HTTP generate_stream, or gRPC ModelStreamInfer for a gRPC URL).")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--version", default="")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="http(s)://host:port, or a gRPC host:port")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="end the text before this string (repeatable)")
    p.add_argument("--token", default="")
    p.add_argument("--tls-ca", default="")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    params = {k: v for k, v in {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
                                "top_p": args.top_p, "seed": args.seed}.items() if v is not None}
    if args.stop:
        params["stop"] = args.stop if len(args.stop) > 1 else args.stop[0]
    client = connect(args.url, args.token, args.tls_ca, args.timeout)
    try:
        sys.stdout.write(args.prompt)
        for chunk in client.generate(args.model, args.version, args.prompt, params):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except RequestFailed as exc:
        print(f"\ndeepserve generate: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
