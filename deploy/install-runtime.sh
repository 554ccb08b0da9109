#!/bin/sh
# Install deepserve's serving half into a fresh virtual environment: the package without extras, so numpy,
# onnxruntime, grpcio(+health, reflection), protobuf and prometheus-client, and never torch.
#
# One script for every serving install, so the install that tests/test_deploy_container.py proves is the one the
# images ship: the runtime stage of Dockerfile and Dockerfile.gpu run it, and the test runs it into a temporary venv.
#
# usage: install-runtime.sh [--gpu] SOURCE_DIR VENV_DIR
#   --gpu      add the `gpu` extra and leave onnxruntime-gpu as the only onnxruntime (see below).
#   PYTHON     the interpreter that creates the venv (default python3).
#   ORT_GPU    with --gpu, an extra requirement that pins onnxruntime-gpu to the CUDA major of the base image.
set -eu

usage="usage: install-runtime.sh [--gpu] SOURCE_DIR VENV_DIR"
gpu=0
if [ "${1:-}" = "--gpu" ]; then
    gpu=1
    shift
fi
src=${1:?$usage}
venv=${2:?$usage}

"${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"

if [ "$gpu" = 1 ]; then
    # shellcheck disable=SC2086  # ORT_GPU is one optional requirement, empty by default
    "$py" -m pip install "${src}[gpu]" ${ORT_GPU:-}
    # onnxruntime (a base dependency) and onnxruntime-gpu install the same `onnxruntime` package directory.
    # Remove the CPU wheel, then lay the GPU wheel's files down again over the ones the removal deleted.
    ort_gpu=$("$py" -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')
    "$py" -m pip uninstall --yes onnxruntime
    "$py" -m pip install --force-reinstall --no-deps "onnxruntime-gpu==$ort_gpu"
    "$py" -c 'import onnxruntime as ort, sys; sys.exit("CUDAExecutionProvider" not in ort.get_available_providers())' \
        || { echo "install-runtime: onnxruntime-gpu has no CUDAExecutionProvider" >&2; exit 1; }
    # pip check now reports deepserve's base requirement on onnxruntime, which onnxruntime-gpu provides; any
    # other broken requirement still fails the build.
    problems=$("$py" -m pip check 2>&1 | grep -v -e '^No broken requirements' \
        -e '^deepserve .* requires onnxruntime, which is not installed' || true)
    if [ -n "$problems" ]; then
        echo "$problems" >&2
        exit 1
    fi
else
    "$py" -m pip install "$src"
    "$py" -m pip check
fi

# The serving install must stay free of torch (DESIGN.md: the service never imports it).
if "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
    echo "install-runtime: torch is in the serving install; a serving dependency pulled it in" >&2
    exit 1
fi
# Fail the build, not the first pod, when the serve command cannot even import.
"$venv/bin/deepserve" serve --help >/dev/null
