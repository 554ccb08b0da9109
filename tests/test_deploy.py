"""The deployment artefacts, checked against the real server: the runtime install the images run, the images'
settings, the Kubernetes and KServe manifests, compose, and the Grafana dashboard.

No Docker engine or cluster runs here, so each test proves the part that can run without one: hadolint on the
Dockerfiles; the runtime stage's install script in a fresh venv, serving a model the way the image starts it;
kubernetes-validate (strict) on the core objects; the server's own `--help` and a real server for every flag, port,
probe and metric the artefacts name."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
import kubernetes_validate
import numpy as np
import pytest
import support
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
K8S_VERSIONS = ("1.30", "1.37")  # the oldest and newest Kubernetes the manifests are checked against
GRPC_PORT, METRICS_PORT = 8001, 8002  # Triton's defaults, which the server and every artefact share
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


@pytest.fixture(scope="module")
def serve_options() -> dict[str, dict]:
    return cli_help("serve")


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


def deployment_args(repo: Path, grpc_port: int, metrics_port: int) -> list[str]:
    """The Deployment's container args, with only the repository, address and ports moved to this machine."""
    local = {"--repository": str(repo), "--host": "127.0.0.1", "--grpc-port": str(grpc_port),
             "--metrics-port": str(metrics_port)}
    values = flag_values(server_container()["args"]) | local
    return [f"{k}={v}" if v is not None else k for k, v in values.items()]


# ------------------------------------------------------------------------------------- Dockerfiles and install


def test_hadolint_passes_both_dockerfiles_and_catches_a_bad_one(tmp_path):
    hadolint = BIN / "hadolint"
    ok = subprocess.run([str(hadolint), "Dockerfile", "Dockerfile.gpu"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install flask\n")
    caught = subprocess.run([str(hadolint), str(bad)], capture_output=True, text=True)
    assert caught.returncode != 0 and "DL3006" in caught.stdout, caught.stdout


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_stages(name, serve_options):
    stages = dockerfile(ROOT / name)
    train = stage_named(stages, "train")
    train_runs = [rest for ins, rest in train if ins == "RUN"]
    torch_at = next(i for i, r in enumerate(train_runs) if "torch==2.13.0" in r)
    extra_at = next(i for i, r in enumerate(train_runs) if "[train]" in r)
    assert torch_at < extra_at, "torch is pinned and installed before the train extra"
    assert any("deepserve train all --repository /models" in r for r in train_runs)
    context = stage_named(stages, "models-context")
    assert any(ins == "COPY" and rest.endswith("/models/") for ins, rest in context)
    assert stage_named(stages, "models")[0][1] == "models-${MODELS} AS models"

    runtime = stages[-1]
    base = runtime[0][1]
    if name == "Dockerfile":
        assert re.fullmatch(r"python:3\.11-slim\S* AS runtime", base), base
    else:
        arg = next(rest for ins, rest in stages[0] if ins == "ARG" and rest.startswith("CUDA_IMAGE="))
        assert base == "${CUDA_IMAGE} AS runtime" and re.match(r"CUDA_IMAGE=nvidia/cuda:\S+-runtime-", arg), arg
    runs = " ".join(rest for ins, rest in runtime if ins == "RUN")
    assert "install-runtime.sh" in runs and "torch" not in runs and "[train]" not in runs
    assert ("--gpu" in runs) == (name == "Dockerfile.gpu")
    user = next(rest for ins, rest in reversed(runtime) if ins == "USER")
    assert int(user.split(":")[0]) != 0, "the server runs as a non-root user"
    assert int(user.split(":")[0]) == server_container_uid(), "the Deployment runs as the image's user"
    expose = [rest for ins, rest in runtime if ins == "EXPOSE"]
    assert expose == [f"{GRPC_PORT} {METRICS_PORT}"]
    assert [rest for ins, rest in runtime if ins == "VOLUME"] == ['["/models"]']
    assert [rest for ins, rest in runtime if ins == "ENTRYPOINT"] == ['["deepserve", "serve"]']
    # Settings come from ENV, so `docker run IMAGE --flag` adds to them instead of replacing a CMD.
    assert not [rest for ins, rest in runtime if ins == "CMD"]

    env = env_of(runtime)
    settings = {k: v for k, v in env.items() if k.startswith("DEEPSERVE_")}
    for key, value in settings.items():
        check_flag(serve_options, env_flag(key), value, f"{name} ENV {key}", env=True)
    assert settings["DEEPSERVE_REPOSITORY"] == "/models"
    assert int(settings["DEEPSERVE_GRPC_PORT"]) == GRPC_PORT
    assert int(settings["DEEPSERVE_METRICS_PORT"]) == METRICS_PORT

    check = healthcheck_command(runtime)
    assert check[:2] == ["sh", "-c"] and check[2].startswith("deepserve health "), check
    health_options = cli_help("health")
    for flag, value in flag_values(shlex.split(check[2].split(" || ")[0])[2:]).items():
        check_flag(health_options, flag, value, f"{name} HEALTHCHECK")
    assert "${DEEPSERVE_GRPC_PORT}" in check[2], "the HEALTHCHECK follows the gRPC port setting"


def server_container_uid() -> int:
    pod = one(k8s_objects(), "Deployment")["spec"]["template"]["spec"]
    return pod["securityContext"]["runAsUser"]


def test_dockerignore_keeps_what_the_build_copies(tmp_path):
    ctx = docker_context(tmp_path / "ctx")
    for excluded in (".git", ".venv", "tests"):
        assert not (ctx / excluded).exists(), f"{excluded} is sent to the Docker daemon"
    for name in ("Dockerfile", "Dockerfile.gpu"):
        for stage in dockerfile(ROOT / name):
            for ins, rest in stage:
                if ins != "COPY" or rest.startswith("--from"):
                    continue
                for src in shlex.split(rest)[:-1]:
                    src = src.replace("${REPOSITORY}", "models")
                    assert (ctx / src).exists(), f"{name}: COPY {src} is not in the build context"
    assert (ctx / "deploy" / "install-runtime.sh").exists()


@pytest.mark.slow
def test_runtime_install_serves_without_torch_as_the_image_starts_it(tmp_path):
    """deploy/install-runtime.sh, as the runtime stage runs it, on the Docker build context, into a fresh venv."""
    ctx = docker_context(tmp_path / "ctx")
    venv = tmp_path / "venv"
    install = subprocess.run(["sh", str(ctx / "deploy" / "install-runtime.sh"), str(ctx), str(venv)],
                             capture_output=True, text=True, env=clean_env(PYTHON=sys.executable), timeout=400)
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    py = venv / "bin" / "python"

    no_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr, no_torch.stderr
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert installed >= SERVING_DEPS, SERVING_DEPS - installed
    assert not installed & {"torch", "onnx", "onnxscript", "scikit-learn", "grpcio-tools", "tritonclient"}

    # Start it as the image does: ENTRYPOINT `deepserve serve`, no arguments, settings from the image's ENV,
    # with only the repository and the ports moved to this machine.
    runtime = dockerfile(ROOT / "Dockerfile")[-1]
    image_env = {k: v for k, v in env_of(runtime).items() if k.startswith("DEEPSERVE_")}
    repo = tiny_repository(tmp_path)
    grpc_port, metrics_port = support.free_port(), support.free_port()
    env = clean_env(**image_env) | {"DEEPSERVE_REPOSITORY": str(repo), "DEEPSERVE_HOST": "127.0.0.1",
                                    "DEEPSERVE_GRPC_PORT": str(grpc_port),
                                    "DEEPSERVE_METRICS_PORT": str(metrics_port),
                                    "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    with running([str(venv / "bin" / "deepserve"), "serve"], env, tmp_path / "serve.log", grpc_port) as proc:
        # The image's HEALTHCHECK command, as Docker runs it.
        check = subprocess.run(healthcheck_command(runtime), env=env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        url = f"127.0.0.1:{grpc_port}"
        ds = str(venv / "bin" / "deepserve")
        for service, want in (("", 0), ("tiny", 0), ("liveness", 0), ("no_such_model", 1)):
            rc = subprocess.run([ds, "health", "--url", url, "--service", service], capture_output=True).returncode
            assert rc == want, f"deepserve health --service {service!r}: exit {rc}"
        x = np.array([[-1.0, 0.5, -2.0, 3.0]], np.float32)
        np.save(tmp_path / "x.npy", x)
        answer = subprocess.run([ds, "infer", "tiny", "--input", f"x={tmp_path / 'x.npy'}", "--url", url],
                                capture_output=True, text=True, timeout=30)
        assert answer.returncode == 0, answer.stdout + answer.stderr
        assert "3" in answer.stdout and "0.5" in answer.stdout, answer.stdout
        assert 'execution_provider="CPUExecutionProvider"' in scrape(metrics_port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, (tmp_path / "serve.log").read_text()
    # Docker marks the container unhealthy when nothing serves.
    down = subprocess.run(healthcheck_command(runtime), env=env, capture_output=True, timeout=30)
    assert down.returncode == 1


# ----------------------------------------------------------------------------------------- Kubernetes, KServe


def test_core_objects_pass_strict_kubernetes_validation():
    core = [o for o in k8s_objects() if o["kind"] not in ("Kustomization", "PodMonitor")]
    assert {o["kind"] for o in core} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                          "PersistentVolumeClaim", "ServiceAccount"}
    # The KServe runtime's container is a core v1 Container: validated inside a Pod.
    runtime_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve-runtime"},
                   "spec": {"containers": kserve_runtime()["spec"]["containers"]}}
    for version in K8S_VERSIONS:
        for obj in [*core, runtime_pod]:
            kubernetes_validate.validate(obj, version, strict=True)
    # The validator is strict: a misspelt field fails.
    broken = json.loads(json.dumps(one(core, "Deployment")))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml_docs(DEPLOY / "k8s" / "kustomization.yaml")[0]
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_manifests_use_real_flags_and_agree_on_ports_probes_and_shutdown(serve_options):
    objects = k8s_objects()
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = pod["containers"][0]
    args = flag_values(container["args"])
    for flag, value in args.items():
        check_flag(serve_options, flag, value, "Deployment args")
    for var in container.get("env", []):
        check_flag(serve_options, env_flag(var["name"]), var.get("value"), "Deployment env", env=True)
    grpc_port = int(effective(serve_options, args, "--grpc-port"))
    metrics_port = int(effective(serve_options, args, "--metrics-port"))
    assert (grpc_port, metrics_port) == (GRPC_PORT, METRICS_PORT)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}

    # Probes: gRPC health on the gRPC port; liveness on the service that stays up while the process runs.
    assert container["livenessProbe"]["grpc"] == {"port": grpc_port, "service": "liveness"}
    assert container["readinessProbe"]["grpc"]["port"] == grpc_port
    assert container["readinessProbe"]["grpc"].get("service", "") == ""

    # Shutdown: grace period > the server's accept-grace + drain (+ any preStop sleep).
    shutdown = float(effective(serve_options, args, "--shutdown-grace-secs"))
    drain = float(effective(serve_options, args, "--drain-secs"))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > shutdown + drain + pre_stop

    # The repository: the --repository folder is a read-only mount of the PVC.
    repository = effective(serve_options, args, "--repository")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == repository)
    assert mount.get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])

    assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), "the HPA's CPU target needs a request"
    assert "memory" in container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]

    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for p in service["spec"]["ports"]:
            assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]], p
    assert {p["name"] for p in one(objects, "Service", "deepserve")["spec"]["ports"]} == {"grpc", "metrics"}

    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"], "a drain leaves a replica serving"

    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e.get("path", "/metrics")) for e in endpoints] == [("metrics", "/metrics")]


def test_kserve_runtime_and_inference_service(serve_options):
    runtime = kserve_runtime()
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert formats["onnx"].get("autoSelect") is True
    assert "grpc-v2" in spec["protocolVersions"]
    assert "v2" not in spec["protocolVersions"], "deepserve has no REST endpoint to offer"
    container = spec["containers"][0]
    assert container["name"] == "kserve-container"
    args = flag_values(container["args"])
    for flag, value in args.items():
        check_flag(serve_options, flag, value, "ServingRuntime args")
    assert effective(serve_options, args, "--repository") == "/mnt/models", "KServe's storage initializer target"
    grpc_port = int(effective(serve_options, args, "--grpc-port"))
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("h2c", grpc_port)]
    metrics_port = effective(serve_options, args, "--metrics-port")
    assert spec["annotations"]["prometheus.kserve.io/port"] == metrics_port
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"

    isvc = one(yaml_docs(DEPLOY / "kserve" / "inferenceservice.yaml"), "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in spec["protocolVersions"]
    scheme, _, rest = model["storageUri"].partition("://")
    assert scheme == "pvc"
    one(k8s_objects(), "PersistentVolumeClaim", rest.split("/")[0])


@pytest.mark.slow
def test_deployment_args_serve_and_shut_down_as_the_probes_expect(tmp_path, serve_options):
    """The Deployment's own args on a real server: both probes pass; on SIGTERM readiness fails at once while
    liveness holds and requests are still answered for the accept-grace; then it exits 0 within the grace period."""
    container = server_container()
    args = flag_values(container["args"])
    shutdown = float(effective(serve_options, args, "--shutdown-grace-secs"))
    grace = one(k8s_objects(), "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    repo = tiny_repository(tmp_path)
    grpc_port, metrics_port = support.free_port(), support.free_port()
    cmd = [str(BIN / "deepserve"), "serve", *deployment_args(repo, grpc_port, metrics_port)]
    liveness = container["livenessProbe"]["grpc"]["service"]
    readiness = container["readinessProbe"]["grpc"].get("service", "")
    with running(cmd, clean_env(), tmp_path / "serve.log", grpc_port, readiness) as proc:
        assert health(grpc_port, liveness) == "SERVING"
        assert health(grpc_port, "tiny") == "SERVING"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert health(grpc_port, readiness) == "NOT_SERVING"
        assert health(grpc_port, liveness) == "SERVING", "a draining pod is not restarted"
        x = np.array([[1.0, -1.0, 2.0, -2.0]], np.float32)
        np.testing.assert_array_equal(infer(grpc_port, x), np.maximum(x, 0))
        assert proc.wait(timeout=grace) == 0, (tmp_path / "serve.log").read_text()
        took = time.monotonic() - t0
    assert shutdown - 0.5 <= took < grace, took


# ------------------------------------------------------------------------------------------ compose, dashboard


def test_compose_stack_parses_and_its_files_exist(serve_options):
    compose = yaml_docs(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert set(services) == {"deepserve", "prometheus", "grafana"}
    for name, svc in services.items():
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image!r})"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if name == "deepserve" and source == "../models":
                continue  # the repository `make models` writes; in a fresh clone only models/README.md
            assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    server = services["deepserve"]
    build = server["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert build["args"]["MODELS"] in ("train", "context")
    env = server.get("environment", {})
    for key, value in env.items():
        check_flag(serve_options, env_flag(key), str(value), "compose environment", env=True)
    grpc_port = int(env.get("DEEPSERVE_GRPC_PORT", serve_options["--grpc-port"]["default"]))
    metrics_port = int(env.get("DEEPSERVE_METRICS_PORT", serve_options["--metrics-port"]["default"]))
    assert {int(p.split(":")[1]) for p in server["ports"]} == {grpc_port, metrics_port}
    drain = float(env.get("DEEPSERVE_DRAIN_SECS", serve_options["--drain-secs"]["default"]))
    shutdown = float(env.get("DEEPSERVE_SHUTDOWN_GRACE_SECS", serve_options["--shutdown-grace-secs"]["default"]))
    assert float(server["stop_grace_period"].rstrip("s")) > drain + shutdown

    prometheus = yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"deepserve:{metrics_port}"]
    datasource = yaml_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")[0]
    prometheus_port = services["prometheus"]["ports"][0].split(":")[1]
    assert [d["url"] for d in datasource["datasources"]] == [f"http://prometheus:{prometheus_port}"]

    # The dashboard provider reads the folder compose mounts the dashboard JSON into.
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "deepserve.yaml")[0]
    path = provider["providers"][0]["options"]["path"]
    host_dir = next(DEPLOY / src for src, dst in mounts.items() if dst == path)
    assert (host_dir / "deepserve.json").is_file()
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/deepserve.json"


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


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "deepserve.json").read_text())


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, expression, legend) for every panel target and every query variable."""
    found = []

    def walk(panels):
        for p in panels:
            found.extend((p["title"], t["expr"], t.get("legendFormat", "")) for t in p.get("targets", []))
            walk(p.get("panels", []))

    d = dashboard()
    walk(d["panels"])
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((f"variable {var['name']}", q, ""))
    return found


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.99, sum by (le, model) (rate(a_seconds_bucket{code!="OK", '
                        'x=~"rate(b)"}[$__rate_interval] offset 5m)))') == {"a_seconds_bucket"}
    assert metric_names("sum without (instance) (c_total) / on (model) group_left (version) d_info or "
                        "vector(0) > bool 1e3") == {"c_total", "d_info"}
    assert metric_names('label_values(m_info{job=~"$job"}, model)') == {"m_info"}
    assert metric_names("label_values(job)") == set()


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


@pytest.mark.slow
def test_every_metric_a_dashboard_query_uses_is_exported_by_a_running_server(tmp_path):
    queries = dashboard_queries()
    used = {name: title for title, expr, _ in queries for name in metric_names(expr)}
    repo = tiny_repository(tmp_path)
    grpc_port, metrics_port = support.free_port(), support.free_port()
    cmd = [str(BIN / "deepserve"), "serve", *deployment_args(repo, grpc_port, metrics_port)]
    with running(cmd, clean_env(), tmp_path / "serve.log", grpc_port):
        x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
        np.testing.assert_array_equal(infer(grpc_port, x), np.maximum(x, 0))
        assert infer(grpc_port, x, input_name="not_an_input") == grpc.StatusCode.INVALID_ARGUMENT
        names, labels = exported(scrape(metrics_port))

    missing = {name: title for name, title in used.items() if name not in names}
    assert not missing, f"dashboard queries use metrics the server does not export: {missing}"
    # The contract the dashboard is built on: each metric exported with its type and labels, and on the dashboard.
    for family, (kind, want) in METRICS.items():
        samples = [family + s for s in SAMPLE_SUFFIXES[kind]]
        assert all(names.get(s) == kind for s in samples), f"{family} is not exported as a {kind}"
        assert any(s in used for s in samples), f"no dashboard panel shows {family}"
        for s in samples:
            if s in labels:  # labelled metrics with no child yet (load failures) have no samples to look at
                assert labels[s] - {"le"} == want, f"{s} has labels {labels[s]}, the contract says {want}"
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= used.keys()
    # The error panels have something to show: the bad request was counted under its status code.
    assert "deepserve_requests_total" in labels
    # Every label a query groups by, filters on or puts in a legend is on the metrics it reads
    # (job and instance are added by Prometheus, le is on histogram buckets).
    for title, expr, legend in queries:
        if expr.startswith("label_values"):
            continue
        wanted = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            wanted |= {w.strip() for w in group.split(",") if w.strip()}
        wanted |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        for name in metric_names(expr):
            have = labels.get(name, set()) | {"job", "instance"}
            if name in labels:
                assert wanted <= have | ({"le"} if name.endswith("_bucket") else set()), (title, name, wanted - have)


def test_dashboard_covers_what_operators_look_at():
    queries = dashboard_queries()
    exprs = [e for _, e, _ in queries]
    assert any("deepserve_requests_total" in e and "code" in e for e in exprs), "requests and errors by code"
    for q in ("0.5", "0.99"):
        assert any(f"histogram_quantile({q}," in e and "deepserve_request_duration_seconds_bucket" in e
                   for e in exprs), f"p{q} latency"
    for metric in ("deepserve_queue_duration_seconds", "deepserve_compute_duration_seconds",
                   "deepserve_batch_size", "deepserve_pending_requests"):
        assert any(metric in e for e in exprs), metric
    # Per model and version: every per-model query follows the dashboard's model and version selectors.
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    assert {"datasource", "job", "model", "version"} <= variables
    for title, expr, _ in queries:
        if any(n.startswith("deepserve_") and not n.startswith("deepserve_grpc_") for n in metric_names(expr)) \
                and not title.startswith("variable") and "load failures" not in title.lower():
            assert 'model=~"$model"' in expr and 'version=~"$version"' in expr, title
    ids = []

    def walk(panels):
        for p in panels:
            ids.append(p["id"])
            assert p["type"] == "row" or p["datasource"]["uid"] == "${datasource}", p["title"]
            walk(p.get("panels", []))

    walk(dashboard()["panels"])
    assert len(ids) == len(set(ids)), "panel ids are unique"
