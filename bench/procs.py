"""The processes under test: the deepserve server and the transport-ceiling servers, each a subprocess on a free
port with its output in a log file, ready when gRPC ServerReady says so, stopped by SIGTERM (their own drain
path), killed only when that hangs. Subprocesses, not threads: each target gets its own GIL and event loop, exactly
as in production, and its RSS can be read on its own for the leak check."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import grpc

from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    """A gRPC server subprocess speaking the inference protocol on 127.0.0.1:port."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path, http_port: int | None = None) -> None:
        self.name, self.argv, self.port, self.log, self.http_port = name, argv, port, log, http_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url_for(self, protocol: str) -> str:
        """host:port of the gRPC or the HTTP listener (perf_analyzer -u takes both without a scheme)."""
        if protocol == "http":
            if self.http_port is None:
                raise ValueError(f"{self.name} serves no HTTP")
            return f"127.0.0.1:{self.http_port}"
        return self.url

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 180.0) -> Target:
        return self.spawn().wait_ready(timeout_s)

    def spawn(self) -> Target:
        """Start the process without waiting, so that several targets can start side by side."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> Target:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.url) as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready; "
                                       f"log {self.log}:\n{self.log.read_text()[-2000:]}")
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                        return self
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s; log {self.log}")

    def rss_bytes(self) -> int:
        """Resident set size now, from /proc (Linux), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds used so far (user + system): the whole process, and its main thread (the event loop's)."""
        hz = os.sysconf("SC_CLK_TCK")

        def ticks(stat: Path) -> int:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])

        return ticks(Path(f"/proc/{self.pid}/stat")) / hz, ticks(Path(f"/proc/{self.pid}/task/{self.pid}/stat")) / hz

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def deepserve(repository: Path, logs: Path, name: str = "server", *extra: str) -> Target:
    """`deepserve serve` with its defaults (plus `extra` flags), on loopback, metrics on a free port too (never
    the fixed 8002), HTTP on a free port (never the fixed 8000)."""
    port, metrics, http = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", "--repository", str(repository), "--grpc-port", str(port),
            "--metrics-port", str(metrics), "--http-port", str(http), "--host", "127.0.0.1", *extra]
    return Target(name, argv, port, logs / f"{name}.log", http)


def ceiling(config: Path, batch: int, version: str, logs: Path, http: bool = True) -> Target:
    """The transport ceilings for one model and batch size: gRPC, and HTTP on the same loop unless `http` is off."""
    port, http_port = free_port(), (free_port() if http else None)
    name = f"ceiling_{config.stem.removesuffix('_served')}_b{batch}"
    argv = [sys.executable, "-m", "bench.ceiling_server", "--config", str(config), "--batch-size", str(batch),
            "--version", version, "--port", str(port), *(["--http-port", str(http_port)] if http else [])]
    return Target(name, argv, port, logs / f"{name}.log", http_port)


def model_info(url: str, model: str) -> tuple[str, bytes]:
    """The served (highest) version of `model` and its config as the server completed it, serialized."""
    with grpc.insecure_channel(url) as ch:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=30)
        cfg = stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=30).config
    version = max(meta.versions, key=int) if meta.versions else "1"
    return version, cfg.SerializeToString()
