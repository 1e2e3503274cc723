"""Airflow tests: need apache-airflow (extra: airflow); reuse the DAG tests' isolated Airflow home."""

import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

pytest.importorskip("airflow", reason="apache-airflow is not installed (extra: airflow)")

# Airflow puts the plugins folder on sys.path; tests that import recap_airflow directly do the same.
if str(REPO / "plugins") not in sys.path:
    sys.path.insert(0, str(REPO / "plugins"))

from tests.dags.conftest import airflow_env  # noqa: E402,F401  (fixture)


@pytest.fixture(scope="session")
def airflow_services(tmp_path_factory, tiny_model):
    """api-server + scheduler + dag-processor on a fresh PostgreSQL database (LocalExecutor)."""
    from tests.airflow.services import AirflowServices, postgres_available

    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("airflow-services")
    lake = home / "lake"
    # The tests' config, but filters run as deployed: on a Dask LocalCluster started by the task
    # (issue 14: its workers died when started from an Airflow task).
    # Like the README's walkthrough (RECAP_CONFIG=demo-config.yaml): the datacomp chain.
    config = yaml.safe_load(Path(os.environ["RECAP_CONFIG"]).read_text()) or {}
    config.setdefault("filter", {}).pop("executor", None)
    config["filter"]["chain"] = "datacomp"
    (home / "recap-config.yaml").write_text(yaml.safe_dump(config))
    extra = {"RECAP_LAKE": str(lake), "RECAP_MODEL": str(tiny_model), "RECAP_RUNNER": "local",
             "RECAP_CONFIG": str(home / "recap-config.yaml"), "RECAP_INCREMENTAL_SCHEDULE": "none"}
    with AirflowServices(home, extra) as services:
        services.lake = lake
        yield services
