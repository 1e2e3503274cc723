"""Every DAG imports cleanly, quickly, without torch or data reads at parse time."""

import json

from tests.dags.conftest import run_python

PARSE = """
import json, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1] if len(sys.argv) > 1 else None)
info = {dag_id: {"tags": sorted(dag.tags), "tasks": [t.task_id for t in dag.tasks],
                 "retries": {t.task_id: t.retries for t in dag.tasks}, "params": sorted(dag.params.keys())}
        for dag_id, dag in bag.dags.items()}
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": info,
                  "torch": "torch" in sys.modules, "pyarrow": "pyarrow" in sys.modules,
                  "recap_tasks": any(m.startswith("recap_tasks") for m in sys.modules),
                  "seconds": time.perf_counter() - t0}))
"""


def test_dags_import_without_errors_or_heavy_imports(airflow_env):
    proc = run_python(PARSE, airflow_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    assert "recap_pipeline" in report["dags"]
    assert not report["torch"] and not report["recap_tasks"]
    dag = report["dags"]["recap_pipeline"]
    assert dag["tasks"] == ["ingest", "filter", "caption", "validate", "publish"]
    assert "recap" in dag["tags"]
    assert dag["retries"]["ingest"] >= 1 and dag["retries"]["validate"] == 0
    assert {"source", "lake", "model", "batch_size", "runner"} <= set(dag["params"])
