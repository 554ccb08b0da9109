"""Container images and the serving install: hadolint, the Dockerfile stages, the build context, and the runtime
install script run into a fresh venv that serves without torch."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import support
from deploy_support import (
    BIN,
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    ROOT,
    SERVING_DEPS,
    check_flag,
    clean_env,
    cli_help,
    docker_context,
    dockerfile,
    env_flag,
    env_of,
    flag_values,
    healthcheck_command,
    k8s_objects,
    one,
    running,
    scrape,
    stage_named,
    tiny_repository,
)

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
    assert expose == [f"{HTTP_PORT} {GRPC_PORT} {METRICS_PORT}"]
    assert [rest for ins, rest in runtime if ins == "VOLUME"] == ['["/models"]']
    assert [rest for ins, rest in runtime if ins == "ENTRYPOINT"] == ['["deepserve", "serve"]']
    # Settings come from ENV, so `docker run IMAGE --flag` adds to them instead of replacing a CMD.
    assert not [rest for ins, rest in runtime if ins == "CMD"]

    env = env_of(runtime)
    settings = {k: v for k, v in env.items() if k.startswith("DEEPSERVE_")}
    for key, value in settings.items():
        check_flag(serve_options, env_flag(key), value, f"{name} ENV {key}", env=True)
    assert settings["DEEPSERVE_REPOSITORY"] == "/models"
    assert int(settings["DEEPSERVE_HTTP_PORT"]) == HTTP_PORT
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
    grpc_port, metrics_port, http_port = support.free_port(), support.free_port(), support.free_port()
    env = clean_env(**image_env) | {"DEEPSERVE_REPOSITORY": str(repo), "DEEPSERVE_HOST": "127.0.0.1",
                                    "DEEPSERVE_HTTP_PORT": str(http_port), "DEEPSERVE_GRPC_PORT": str(grpc_port),
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


