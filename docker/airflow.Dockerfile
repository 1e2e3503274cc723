# Airflow image: Airflow, the DAGs, the plugins and recap_tasks without the GPU/model extras (no
# torch). Runs every Airflow service of docker-compose.yml and the CPU stages (ingest, the filter's
# Dask client, validate, publish, report); caption runs on the worker image (worker.Dockerfile): on
# the compose stack's Dask workers (runner=dask) or in GPU pods (runner=kubernetes).
# Airflow is installed with pip on the official Python image, as Airflow's docs describe for custom
# images, at the versions requirements/constraints.txt pins (apache-airflow==3.3.x among them).
# BASE_IMAGE: any Debian-based image with Python 3.11 on PATH as python3 (./dev compose-smoke builds
# on a stand-in: docker/standins/python.Dockerfile). Dask pickles between this image and the worker
# image's workers: both must run the same Python minor version.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    AIRFLOW_HOME=/opt/airflow

# libgomp1: OpenMP runtime of the ONNX/numpy filters; curl: the compose health check. The user is
# Airflow's usual one: uid 50000 in group 0, so that any uid of group 0 shares its files.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home airflow \
 && chmod g+rwx /opt/airflow

# Build-time pip settings (a CA bundle, a wheel folder, another index): passed as build args,
# they reach pip as environment variables of these RUN steps only, never the image.
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

# Dependencies first, from pyproject.toml and the constraints with an empty package in place of the
# source, so that a source change reinstalls only recap itself (next step); pip's cache is a build
# cache mount.
WORKDIR /opt/recap
COPY pyproject.toml ./
COPY requirements/constraints.txt requirements/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir recap_tasks && touch README.md recap_tasks/__init__.py \
 && pip install --upgrade pip==25.3 \
 && pip install -c requirements/constraints.txt ".[airflow]" \
 && rm -r README.md recap_tasks

COPY README.md ./
COPY recap_tasks recap_tasks
RUN pip install --no-cache-dir --no-deps . && rm -rf build

COPY dags /opt/airflow/dags
COPY plugins /opt/airflow/plugins
ENV RECAP_LAKE=/lake
WORKDIR /opt/airflow
USER 50000:0
CMD ["airflow", "--help"]
