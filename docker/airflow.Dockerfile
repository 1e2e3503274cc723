# Airflow image: DAGs, plugins and recap_tasks without the GPU/model extras (no torch).
# Runs every Airflow service in docker-compose.yml and the CPU stages (ingest, filter on Dask,
# validate, publish, report); caption runs in GPU pods (worker.Dockerfile) or, with
# runner=local, as a subprocess here.
FROM apache/airflow:3.3.2-python3.11

USER root
# libgomp1: OpenMP runtime of the ONNX/numpy filters.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
USER 50000

WORKDIR /opt/recap
COPY --chown=50000:0 pyproject.toml README.md ./
COPY --chown=50000:0 requirements/constraints.txt requirements/constraints.txt
COPY --chown=50000:0 recap_tasks recap_tasks
RUN pip install --no-cache-dir -c requirements/constraints.txt "." \
      "apache-airflow-providers-cncf-kubernetes>=10.20,<11" "psycopg2-binary>=2.9.9,<3" "asyncpg>=0.30,<1"

COPY --chown=50000:0 dags /opt/airflow/dags
COPY --chown=50000:0 plugins /opt/airflow/plugins
ENV RECAP_LAKE=/lake
