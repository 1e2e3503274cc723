"""recap_pipeline's dry run under dag.test(): plans work units, renders the pod, writes nothing."""

import json
import subprocess
import sys

RUN = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag().get_dag("recap_pipeline")
run = dag.test(run_conf=json.loads(sys.argv[1]))
states = {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in run.get_task_instances()}
print(json.dumps({"state": str(run.state), "run_id": run.run_id, "tasks": states}))
"""


def test_dry_run_plans_and_renders_without_writing(airflow_env, tmp_path, sample_shards, tiny_model):
    conf = {"source": f"{sample_shards}/*.tar", "lake": str(tmp_path / "lake"), "model": str(tiny_model),
            "runner": "kubernetes", "dry_run": True, "shard_limit": 1}
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(conf)], env=airflow_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state"].endswith("success"), result
    assert result["tasks"]["plan[-1]"] == "success"
    skipped = {t for t, s in result["tasks"].items() if s.endswith("skipped")}
    assert {"ingest[-1]", "validate[-1]", "publish[-1]", "report[-1]"} <= skipped
    logs = proc.stdout + proc.stderr
    assert "nvidia.com/gpu" in logs and "shards/00000.tar" in logs  # the rendered pod of the first unit
    assert "00001.tar" not in logs.split("work units:")[1].split("]]")[0]  # shard_limit=1
    assert not (tmp_path / "lake").exists()
