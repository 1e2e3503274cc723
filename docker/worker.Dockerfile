# GPU worker image: recap_tasks with the `gpu` extra on a CUDA runtime, run as a non-root user.
# Pods built by plugins/recap_airflow/pods.py run: python -m recap_tasks caption --lake ... --model ...
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models/hf

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 --user-group recap

WORKDIR /opt/recap
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY recap_tasks recap_tasks
# torch 2.13.0 from PyPI is the CUDA build; the constraints pin every other package.
RUN pip install --upgrade pip==25.3 \
 && pip install -c requirements/constraints.txt ".[gpu]"
# caption.backend: vllm. vLLM pins its own CUDA torch and transformers, so it gets its own
# environment; the caption stage runs recap_tasks/captioning/vllm_worker.py with its python.
COPY requirements/vllm/gpu.txt requirements/vllm/gpu.txt
RUN python3 -m venv /opt/vllm \
 && /opt/vllm/bin/pip install --upgrade pip==25.3 \
 && /opt/vllm/bin/pip install -r requirements/vllm/gpu.txt
# The root filesystem is read-only in pods: vLLM's compile caches go to the /tmp volume.
ENV RECAP_VLLM_PYTHON=/opt/vllm/bin/python \
    XDG_CACHE_HOME=/tmp/.cache \
    VLLM_CACHE_ROOT=/tmp/.cache/vllm \
    TRITON_CACHE_DIR=/tmp/.cache/triton

# The pod security context runs as 10001 with a read-only root filesystem: /tmp, /dev/shm, the
# lake and the model cache are volumes.
USER 10001:10001
ENTRYPOINT ["python", "-m", "recap_tasks"]
CMD ["--help"]
