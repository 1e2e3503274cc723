"""An isolated Airflow home (own metadata DB, our dags/ and plugins/) for DAG tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("airflow", reason="apache-airflow is not installed (extra: airflow)")


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "RECAP_QUIET": "1",
    }
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True,
                   timeout=300)
    return env


def run_python(code: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


DAG_TEST = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag().get_dag(sys.argv[1])
run = dag.test(run_conf=json.loads(sys.argv[2]))
states = {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in run.get_task_instances()}
print(json.dumps({"state": str(run.state), "run_id": run.run_id, "tasks": states}))
"""


def dag_test(dag_id: str, conf: dict, env: dict[str, str], timeout: int = 900) -> tuple[dict, str]:
    """Run a DAG in-process with `dag.test()` in a subprocess: (run state and task states, its log)."""
    import json

    proc = subprocess.run([sys.executable, "-c", DAG_TEST, dag_id, json.dumps(conf)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr
