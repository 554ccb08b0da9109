# syntax=docker/dockerfile:1
# deepserve, CPU image. Two halves that meet at the model repository, as in the code:
#   train    python + the `train` extra (torch), runs the example jobs into /models   (build stage only)
#   runtime  slim python + the serving install only (no torch, no compilers), non-root, serves /models
#
#   docker build -t deepserve .                                         # trains the example models (CPU torch)
#   docker build -t deepserve --build-arg MODELS=context .              # copies ./models instead, no torch at all
#   docker build -t deepserve --build-arg MODELS=context --build-arg REPOSITORY=path/in/context .
#   docker run -p 8000:8000 -p 8001:8001 -p 8002:8002 deepserve         # or -v "$PWD/models:/models:ro"
# GPU: Dockerfile.gpu. Needs BuildKit (the default builder since Docker 23) for RUN --mount.

# Where the runtime stage's /models comes from: `train` (the jobs run in the build) or `context` (the build context).
ARG MODELS=train

FROM python:3.11-slim-bookworm AS train
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# torch first and pinned, from the CPU wheel index: the PyPI build of the same version pulls gigabytes of CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY training/ training/
COPY bench/ bench/
RUN pip install "/src[train]" && pip check
RUN deepserve train all --repository /models

FROM scratch AS models-train
COPY --from=train /models/ /models/

FROM scratch AS models-context
# A repository directory inside the build context (Triton layout: <name>/config.pbtxt, <name>/<version>/model.onnx).
ARG REPOSITORY=models
COPY ${REPOSITORY}/ /models/

# BuildKit builds only the stages the target needs: with MODELS=context the torch stage never runs.
# (hadolint reads models-${MODELS} as an untagged image; it is one of the two stages above.)
# hadolint ignore=DL3006
FROM models-${MODELS} AS models

FROM python:3.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="deepserve" \
      org.opencontainers.image.description="ONNX models over the Open Inference Protocol (KServe V2 / Triton, HTTP/REST and gRPC)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/deepserve/bin:$PATH
# The one serving install, shared with tests/test_deploy_container.py. The context is bind-mounted (writable,
# discarded), so no source layer stays in the image.
RUN --mount=type=bind,target=/src,rw sh /src/deploy/install-runtime.sh /src /opt/deepserve
RUN groupadd --system --gid 10001 deepserve \
    && useradd --system --uid 10001 --gid deepserve --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin deepserve
# Owned by root, readable by all: the server only reads its repository.
COPY --from=models /models/ /models/
# Server settings as the server's own environment variables (DEEPSERVE_<FLAG>); `docker run -e` and the
# Kubernetes manifests override them, and the HEALTHCHECK follows DEEPSERVE_GRPC_PORT.
ENV DEEPSERVE_REPOSITORY=/models \
    DEEPSERVE_HOST=0.0.0.0 \
    DEEPSERVE_HTTP_PORT=8000 \
    DEEPSERVE_GRPC_PORT=8001 \
    DEEPSERVE_METRICS_PORT=8002
VOLUME ["/models"]
USER 10001:10001
# 8000 HTTP/REST (KServe V2 / Triton HTTP API); 8001 gRPC (inference, grpc.health.v1, reflection);
# 8002 Prometheus /metrics.
EXPOSE 8000 8001 8002
# A plaintext check over gRPC, which is always on (--http-port=0 turns HTTP off): with --tls-cert the container's
# health needs its own probe.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "deepserve health --url \"127.0.0.1:${DEEPSERVE_GRPC_PORT}\" --timeout 3 || exit 1"]
# SIGTERM (docker stop, Kubernetes) drains in-flight requests for up to --drain-secs (30 s): give the container
# longer than that (docker stop -t 45, compose stop_grace_period, terminationGracePeriodSeconds).
ENTRYPOINT ["deepserve", "serve"]
