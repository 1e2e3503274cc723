# Airflow image: DAGs, plugins and recap_tasks without the GPU/model extras (no torch).
FROM apache/airflow:3.3.2-python3.11

USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
USER airflow

WORKDIR /opt/recap
COPY --chown=airflow:root pyproject.toml README.md ./
COPY --chown=airflow:root requirements/constraints.txt requirements/constraints.txt
COPY --chown=airflow:root recap_tasks recap_tasks
RUN pip install --no-cache-dir -c requirements/constraints.txt "." "apache-airflow-providers-cncf-kubernetes>=10.20,<11"

COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
