# vitserve CPU serving image: onnxruntime + FastAPI (the `serve` extra) and gRPC (the `grpc` extra), no torch,
# non-root, tini as PID 1. HTTP on 8000; the Open Inference Protocol over gRPC on 8001 (VITSERVE_GRPC_PORT=0: off).
#
#   docker build -t vitserve .                                   # no model inside: mount one at /models
#   docker run --rm -p 8000:8000 -p 8001:8001 -v "$PWD/models:/models:ro" vitserve
#   docker build --build-arg MODELS=models -t vitserve:demo .    # bake ./models (run `make models` first)
#   docker build --build-arg EXTRAS=serve,grpc,openvino -t vitserve:openvino .   # with the OpenVINO runtime too
#
# Settings are VITSERVE_* environment variables (README, "Configuration"); `docker run IMAGE vit-serve --help`.
ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: a virtual environment with the serving install, nothing else ----
FROM ${PYTHON_IMAGE} AS builder
# The extras installed: the serving image has onnxruntime only; add `openvino` for --runtime openvino (README, "Runtimes").
ARG EXTRAS=serve,grpc
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, read from pyproject's extras, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import sys, tomllib; extras = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; print('\n'.join(r for e in sys.argv[1].split(',') for r in extras[e]))" "${EXTRAS}" > requirements-serve.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r requirements-serve.txt
# Only the service and the torch-free packages under it are copied: model/ and export/ (torch) never enter the image.
COPY modelrepo/ modelrepo/
COPY imageprep/ imageprep/
COPY service/ service/
RUN /opt/venv/bin/pip install --no-cache-dir ".[${EXTRAS}]" \
 && /opt/venv/bin/pip uninstall --yes setuptools pip \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# ---- runtime ----
FROM ${PYTHON_IMAGE}
# tini is PID 1: it forwards SIGTERM to vit-serve (which drains, then exits 0) and reaps zombies.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupadd --system --gid 10001 vitserve \
 && useradd --system --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vitserve
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/lib/vitserve/healthcheck.py
# The model repository: a mount at /models (default), or baked in with --build-arg MODELS=<folder in the context>.
ARG MODELS=docker/no-models
COPY ${MODELS}/ /models/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VITSERVE_REPO=/models \
    VITSERVE_HOST=0.0.0.0 \
    VITSERVE_PORT=8000 \
    VITSERVE_GRPC_PORT=8001 \
    VITSERVE_DEVICE=cpu \
    VITSERVE_DRAIN_TIMEOUT_S=30 \
    VITSERVE_LOG_LEVEL=info

USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001
# Healthy = /readyz answers 200 (models loaded and warmed; 503 while loading or draining).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/lib/vitserve/healthcheck.py"]
# `docker stop` sends SIGTERM; give it more than VITSERVE_DRAIN_TIMEOUT_S: `docker stop -t 40`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--"]
CMD ["vit-serve"]
