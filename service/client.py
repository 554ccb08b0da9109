"""`deepserve infer` and `deepserve health`: small gRPC clients on our own stubs, for people and for probes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
import numpy as np

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc
from service.tensors import BY_WIRE, BYTES, decode_bytes, to_raw


def _channel(url: str, tls_ca: str = "") -> grpc.Channel:
    if tls_ca:
        return grpc.secure_channel(url, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
    return grpc.insecure_channel(url)


def decode_output(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes) -> np.ndarray:
    dt = BY_WIRE[tensor.datatype]
    shape = tuple(tensor.shape)
    if dt is BYTES:
        return decode_bytes(raw, int(np.prod(shape)), tensor.name).reshape(shape)
    return np.frombuffer(raw, dtype=dt.numpy).reshape(shape)


def build_request(model: str, version: str, feeds: dict[str, np.ndarray], metadata: pb.ModelMetadataResponse,
                  classification: dict[str, int] | None = None) -> pb.ModelInferRequest:
    specs = {t.name: t for t in metadata.inputs}
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, arr in feeds.items():
        if name not in specs:
            raise SystemExit(f"model {model} has no input {name!r}; inputs: {', '.join(specs)}")
        dt = BY_WIRE[specs[name].datatype]
        arr = np.asarray(arr, dtype=dt.numpy) if dt is not BYTES else np.asarray(arr, dtype=object)
        req.inputs.add(name=name, datatype=dt.wire, shape=arr.shape)
        req.raw_input_contents.append(to_raw(arr, dt))
    for name, k in (classification or {}).items():
        out = req.outputs.add(name=name)
        out.parameters["classification"].int64_param = k
    return req


def _examples(repository: Path, model: str, version: str) -> Path:
    model_dir = repository / model
    versions = sorted((int(p.name) for p in model_dir.glob("[0-9]*") if (p / "examples.npz").is_file()),
                      reverse=True)
    if version:
        versions = [int(version)] if int(version) in versions else []
    if not versions:
        raise SystemExit(f"no examples.npz for {model} under {model_dir} (published by `deepserve train`)")
    return model_dir / str(versions[0]) / "examples.npz"


def infer_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="deepserve infer", description="Send one inference request and print the "
                                "outputs.")
    p.add_argument("model")
    p.add_argument("--version", default="")
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input from a .npy")
    p.add_argument("--examples", action="store_true", help="send the model's published examples.npz and compare "
                   "the predictions with the true labels")
    p.add_argument("--text", action="append", default=[], help="raw text for a model with a text input "
                   "(repeatable: one sample each)")
    p.add_argument("--repository", default="models", help="where --examples looks for examples.npz")
    p.add_argument("--top", type=int, default=3, help="classes to show per sample for classifiers")
    p.add_argument("--token", default="", help="bearer token for a server started with --auth-token-file")
    p.add_argument("--tls-ca", default="", help="CA bundle to verify a TLS server")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    meta = [("authorization", f"Bearer {args.token}")] if args.token else None
    with _channel(args.url, args.tls_ca) as ch:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
        try:
            md = stub.ModelMetadata(pb.ModelMetadataRequest(name=args.model, version=args.version),
                                    timeout=args.timeout, metadata=meta)
            labels = None
            if args.examples:
                data = np.load(_examples(Path(args.repository), args.model, args.version), allow_pickle=False)
                feeds = {t.name: data[t.name] for t in md.inputs if t.name in data}
                labels = data.get("label")
            elif args.text:
                text_inputs = [t.name for t in md.inputs if t.datatype == "BYTES"]
                if not text_inputs:
                    raise SystemExit(f"model {args.model} has no text (BYTES) input")
                feeds = {text_inputs[0]: np.array([t.encode() for t in args.text], dtype=object)}
            else:
                feeds = {}
                for item in args.input:
                    name, _, path = item.partition("=")
                    feeds[name] = np.load(path, allow_pickle=False)
            if not feeds:
                raise SystemExit("nothing to send: give --input NAME=FILE.npy or --examples")
            outputs = [t.name for t in md.outputs]
            cls = {"probabilities": args.top} if "probabilities" in outputs and args.top else None
            reply = stub.ModelInfer(build_request(args.model, args.version, feeds, md), timeout=args.timeout,
                                    metadata=meta)
            top = stub.ModelInfer(build_request(args.model, args.version, feeds, md, cls), timeout=args.timeout,
                                  metadata=meta) if cls else None
        except grpc.RpcError as exc:
            print(f"deepserve infer: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{reply.model_name} version {reply.model_version}")
    results = {t.name: decode_output(t, raw) for t, raw in zip(reply.outputs, reply.raw_output_contents,
                                                                 strict=True)}
    for name, arr in results.items():
        print(f"  {name} {arr.dtype} {list(arr.shape)}")
    if top is not None:
        classes = decode_output(top.outputs[0], top.raw_output_contents[0])
        predicted = np.argmax(results["probabilities"], axis=-1)
        for i, row in enumerate(classes):
            shown = "  ".join(c.decode() for c in row)
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
    p = argparse.ArgumentParser(prog="deepserve health", description="gRPC health check (grpc.health.v1); exit 0 "
                                "when SERVING, 1 otherwise. For container HEALTHCHECKs and scripts.")
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--service", default="", help="'' for the server, a model name for one model, 'liveness'")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--tls-ca", default="")
    args = p.parse_args(argv)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(args.url, args.tls_ca) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                         timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
