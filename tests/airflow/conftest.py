"""Airflow tests: need apache-airflow (extra: airflow); reuse the DAG tests' isolated Airflow home."""

import sys

import pytest

from tests.helpers import REPO

pytest.importorskip("airflow", reason="apache-airflow is not installed (extra: airflow)")

# Airflow puts the plugins folder on sys.path; tests that import recap_airflow directly do the same.
if str(REPO / "plugins") not in sys.path:
    sys.path.insert(0, str(REPO / "plugins"))

from tests.dags.conftest import airflow_env  # noqa: E402,F401  (fixture)
