# Worker image: recap_tasks with the `gpu` extra (torch, transformers, accelerate); its entry point
# `python -m recap_tasks` is what caption pods run (plugins/recap_airflow/pods.py: python -m
# recap_tasks caption --lake ... --model ...), and the compose stack's Dask workers run the same
# command for runner=dask.
# BASE_IMAGE: the CUDA runtime for GPU nodes (default). docker-compose.yml builds this file on
# python:3.11-slim-bookworm for CPU: torch from PyTorch's CPU index (PIP_EXTRA_INDEX_URL) and no
# vLLM (VLLM_REQUIREMENTS empty). A Dask worker must run the Python minor version of the Airflow
# image (3.11), which the CUDA base (Ubuntu 24.04: 3.12) does not; its pods do not use Dask.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models/hf

# python3 from the base when it has one (the Python images), else from its distribution (CUDA).
# The user `recap` is in group 0, so that any uid of group 0 shares its files (docker-compose.yml).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
 && { command -v python3 >/dev/null || apt-get install -y --no-install-recommends python3 python3-venv; } \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 --gid 0 recap

# Build-time pip settings (a CA bundle, a wheel folder, PyTorch's CPU index): passed as build args,
# they reach pip as environment variables of these RUN steps only, never the image.
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

# Dependencies first, from pyproject.toml and the constraints with an empty package in place of the
# source, so that a source change reinstalls only recap itself; pip's cache is a build cache mount.
# torch==2.13.0 is the CUDA build from PyPI, the CPU build from a CPU index or wheel folder.
WORKDIR /opt/recap
COPY pyproject.toml ./
COPY requirements/constraints.txt requirements/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir recap_tasks && touch README.md recap_tasks/__init__.py \
 && pip install --upgrade pip==25.3 \
 && pip install -c requirements/constraints.txt ".[gpu]" \
 && rm -r README.md recap_tasks

# caption.backend: vllm. vLLM pins its own CUDA torch and transformers, so it gets its own
# environment; the caption stage runs recap_tasks/captioning/vllm_worker.py with its python.
ARG VLLM_REQUIREMENTS=requirements/vllm/gpu.txt
COPY requirements/vllm requirements/vllm
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$VLLM_REQUIREMENTS" ]; then \
      python3 -m venv /opt/vllm \
      && /opt/vllm/bin/pip install --upgrade pip==25.3 \
      && /opt/vllm/bin/pip install -r "$VLLM_REQUIREMENTS"; \
    fi
# The root filesystem is read-only in pods: vLLM's compile caches go to the /tmp volume.
ENV RECAP_VLLM_PYTHON=/opt/vllm/bin/python \
    XDG_CACHE_HOME=/tmp/.cache \
    VLLM_CACHE_ROOT=/tmp/.cache/vllm \
    TRITON_CACHE_DIR=/tmp/.cache/triton

COPY README.md ./
COPY recap_tasks recap_tasks
RUN pip install --no-cache-dir --no-deps . && rm -rf build

# The pod security context runs as 10001 with a read-only root filesystem: /tmp, /dev/shm, the
# lake and the model cache are volumes.
USER 10001:0
ENTRYPOINT ["python", "-m", "recap_tasks"]
CMD ["--help"]
