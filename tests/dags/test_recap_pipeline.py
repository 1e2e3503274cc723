"""The recap_pipeline DAG runs every stage with dag.test() on sample data (local runner)."""

import json
import subprocess
import sys

from recap_tasks import lake as tables
from recap_tasks.lake import Lake
from recap_tasks.status import lake_status

RUN = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag().get_dag("recap_pipeline")
run = dag.test(run_conf=json.loads(sys.argv[1]))
states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
print(json.dumps({"state": str(run.state), "run_id": run.run_id, "tasks": states}))
"""


def test_dag_test_publishes_sample_data(airflow_env, tmp_path, sample_shards, tiny_model):
    conf = {"source": str(sample_shards), "lake": str(tmp_path / "lake"), "model": str(tiny_model),
            "batch_size": 4}
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(conf)], env=airflow_env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state"].endswith("success"), result
    assert set(result["tasks"]) == {"ingest", "filter", "caption", "validate", "publish"}
    lake = Lake(tmp_path / "lake")
    status = lake_status(lake)
    assert status["published"] == 18 and status["balanced"]
    # Rows carry the Airflow run id, so a published row leads back to its DAG run.
    run_ids = set(lake.read(tables.RECAP, ["publish_run_id"]).column("publish_run_id").to_pylist())
    assert run_ids == {result["run_id"].replace(":", "-").replace("+", "-")}
