"""Helpers for the deploy tests: parse Dockerfiles, manifests and `deepserve serve --help`; build a Docker-like
context; run a server as the image would."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import support
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
K8S_VERSIONS = ("1.30", "1.37")  # the oldest and newest Kubernetes the manifests are checked against
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002  # Triton's defaults, which the server and every artefact share
KSERVE_HTTP_PORT, KSERVE_GRPC_PORT = 8080, 9000  # where KServe sends REST and gRPC (its own Triton runtime's)
SERVING_DEPS = {"numpy", "onnxruntime", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf",
                "prometheus-client"}
# The metric contract (DESIGN.md): family name -> (type, labels). The dashboard is built on it.
METRICS = {
    "deepserve_requests": ("counter", {"model", "version", "code"}),
    "deepserve_inferences": ("counter", {"model", "version"}),
    "deepserve_executions": ("counter", {"model", "version"}),
    "deepserve_request_duration_seconds": ("histogram", {"model", "version"}),
    "deepserve_queue_duration_seconds": ("histogram", {"model", "version"}),
    "deepserve_compute_duration_seconds": ("histogram", {"model", "version"}),
    "deepserve_batch_size": ("histogram", {"model", "version"}),
    "deepserve_pending_requests": ("gauge", {"model", "version"}),
    "deepserve_model_load_duration_seconds": ("gauge", {"model", "version"}),
    "deepserve_model_info": ("gauge", {"model", "version", "platform", "execution_provider"}),
    "deepserve_model_load_failures": ("counter", {"model"}),
    "deepserve_grpc_requests": ("counter", {"method", "code"}),
    "deepserve_grpc_request_duration_seconds": ("histogram", {"method"}),
}
# The HTTP front end's own figures (issue 13), beside the gRPC ones; the per-model ones above cover both protocols.
HTTP_METRICS = {
    "deepserve_http_requests": ("counter", {"endpoint", "code"}),
    "deepserve_http_request_duration_seconds": ("histogram", {"endpoint"}),
}
# Labels Prometheus adds to every scraped series (static targets; the Prometheus Operator's PodMonitor adds the rest).
SCRAPE_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service"}
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                   "summary": ("", "_sum", "_count"), "info": ("_info",), "unknown": ("",)}


# ---------------------------------------------------------------------------------------------------- helpers


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> list[dict]:
    return [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml_docs(p)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container() -> dict:
    return one(k8s_objects(), "Deployment")["spec"]["template"]["spec"]["containers"][0]


def kserve_runtime() -> dict:
    return one(yaml_docs(DEPLOY / "kserve" / "servingruntime.yaml"), "ServingRuntime")


def dockerfile(path: Path) -> list[list[tuple[str, str]]]:
    """Stages of a Dockerfile as (INSTRUCTION, arguments) pairs, continuations joined and comments dropped."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        if logical.strip():
            instruction, _, rest = logical.strip().partition(" ")
            if instruction.upper() == "FROM":
                stages.append([])
            stages[-1].append((instruction.upper(), rest.strip()))
        logical = ""
    return stages


def stage_named(stages, name: str) -> list[tuple[str, str]]:
    return next(s for s in stages if s and s[0][0] == "FROM" and s[0][1].endswith(f" AS {name}"))


def env_of(stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, rest in stage:
        if ins == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(rest))
    return env


def healthcheck_command(stage) -> list[str]:
    rest = next(rest for ins, rest in stage if ins == "HEALTHCHECK")
    return json.loads(rest.split(" CMD ", 1)[1])


def parse_help(text: str) -> dict[str, dict]:
    """Options of an argparse --help: flag -> choices, default, and whether it takes a value. A long option's help
    starts on the next line, so help lines are gathered up to the next option."""
    entries: list[tuple[str, str]] = []
    for line in text.split("options:", 1)[-1].splitlines():
        m = re.match(r"^ {2}(-\S.*?)(?: {2,}(.*))?$", line)
        if m:
            entries.append((m.group(1), m.group(2) or ""))
        elif entries and line.strip():
            entries[-1] = (entries[-1][0], f"{entries[-1][1]} {line.strip()}")
    options: dict[str, dict] = {}
    for spec, help_text in entries:
        default = re.search(r"\(default: (.*)\)\s*$", help_text)
        for part in spec.split(", "):
            flag, _, metavar = part.partition(" ")
            choices = re.fullmatch(r"\{(.*)\}", metavar)
            options[flag] = {"takes_value": bool(metavar), "choices": choices.group(1).split(",") if choices else None,
                             "default": default.group(1) if default else None}
    return options


def cli_help(command: str) -> dict[str, dict]:
    # Defaults follow DEEPSERVE_* variables, so the help is taken in an environment without them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSERVE_")} | {"COLUMNS": "1000"}
    out = subprocess.run([str(BIN / "deepserve"), command, "--help"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    options = parse_help(out.stdout)
    assert "--help" in options, out.stdout
    return options


def flag_values(args: list[str]) -> dict[str, str | None]:
    """`--flag=value`, `--flag value` and bare `--flag` in an argument list."""
    values: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        a = args[i]
        assert a.startswith("--"), f"unexpected positional argument {a!r} in {args}"
        if "=" in a:
            k, v = a.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            k, v = a, args[i + 1]
            i += 1
        else:
            k, v = a, None
        values[k] = v
        i += 1
    return values


def env_flag(name: str) -> str:
    assert name.startswith("DEEPSERVE_"), name
    return "--" + name.removeprefix("DEEPSERVE_").lower().replace("_", "-")


def check_flag(options: dict[str, dict], flag: str, value: str | None, where: str, env: bool = False) -> None:
    """`flag` is an option of the command and `value` one it accepts (as an argument, or as its env variable)."""
    assert flag in options, f"{where}: {flag} is not a `deepserve` option (has {sorted(options)})"
    opt = options[flag]
    if not opt["takes_value"]:
        if env:
            assert str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"), f"{where}: {value}"
        else:
            assert value is None, f"{where}: {flag} is a switch and takes no value"
        return
    assert value is not None, f"{where}: {flag} needs a value"
    if opt["choices"]:
        assert value in opt["choices"], f"{where}: {flag}={value} is not one of {opt['choices']}"
    elif opt["default"] and re.fullmatch(r"-?\d+", opt["default"]):
        assert re.fullmatch(r"-?\d+", value), f"{where}: {flag}={value} is not an integer"
    elif opt["default"] and re.fullmatch(r"-?\d+\.\d*", opt["default"]):
        float(value)


def effective(options: dict[str, dict], values: dict[str, str | None], flag: str) -> str:
    """What the server uses for `flag`: the given value, else its default."""
    return values[flag] if values.get(flag) is not None else options[flag]["default"]


def ignored_by_dockerignore() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rx = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((negate, re.compile(rx + "$")))
    return rules


def docker_context(dest: Path) -> Path:
    """A copy of what `docker build .` sends: the repository less what .dockerignore excludes (a path is excluded
    when it or a parent folder matches; later `!` rules re-include)."""
    rules = ignored_by_dockerignore()

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        out = False
        for negate, rx in rules:
            if any(rx.match("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
                out = not negate
        return out

    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = Path(dirpath).relative_to(ROOT)
        dirnames[:] = [d for d in dirnames if not excluded((rel_dir / d).as_posix())]
        for f in filenames:
            rel = (rel_dir / f).as_posix()
            if not excluded(rel) and not os.path.islink(os.path.join(dirpath, f)):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.join(dirpath, f), dest / rel)
    return dest


def tiny_repository(root: Path) -> Path:
    """repo/tiny/1/model.onnx: y = relu(x), FP32 [batch, 4], no config.pbtxt (the server completes it)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y])
    repo = root / "repo"
    support.save(helper.make_model(graph), repo, "tiny")
    return repo


def health(port: int, service: str = "") -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def infer(port: int, x: np.ndarray, input_name: str = "x") -> np.ndarray | grpc.StatusCode:
    from service._proto import inference_pb2, inference_pb2_grpc

    req = inference_pb2.ModelInferRequest(model_name="tiny", raw_input_contents=[x.astype(np.float32).tobytes()])
    req.inputs.add(name=input_name, datatype="FP32", shape=x.shape)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            reply = inference_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(tuple(reply.outputs[0].shape))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


@contextmanager
def running(cmd: list[str], env: dict[str, str], log: Path, grpc_port: int, ready_service: str = ""):
    """A server process, waited for until its health `ready_service` is SERVING; killed on the way out."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    try:
        deadline = time.monotonic() + 60
        while health(grpc_port, ready_service) != "SERVING":
            assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server not SERVING after 60 s:\n{log.read_text()}"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def clean_env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DEEPSERVE_")} | extra


def deployment_args(repo: Path, grpc_port: int, metrics_port: int, http_port: int) -> list[str]:
    """The Deployment's container args, with only the repository, address and ports moved to this machine (every
    port free, so parallel servers never meet on 8000)."""
    local = {"--repository": str(repo), "--host": "127.0.0.1", "--http-port": str(http_port),
             "--grpc-port": str(grpc_port), "--metrics-port": str(metrics_port)}
    values = flag_values(server_container()["args"]) | local
    return [f"{k}={v}" if v is not None else k for k, v in values.items()]




PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana label_values() variable query)."""
    expr = expr.strip()
    lv = re.fullmatch(r"label_values\((.*)\)", expr, re.S)
    if lv:  # label_values(metric{...}, label) or label_values(label)
        inner = lv.group(1)
        return metric_names(inner.rsplit(",", 1)[0]) if "," in inner else set()
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings hold label values, not names
    s = re.sub(r"'(?:\\.|[^'\\])*'", "''", s)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*(\()?", s):
        if not m.group(2) and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def exported(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """From a /metrics page: every sample name it exports or declares (family + its type's suffixes) -> family
    type, and the labels seen on each sample name."""
    names: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SAMPLE_SUFFIXES[family.type]:
            names[family.name + suffix] = family.type
        for sample in family.samples:
            names.setdefault(sample.name, family.type)
            labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels
