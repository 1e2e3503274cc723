"""Every DAG imports cleanly, quickly, without torch, recap_tasks or data reads at parse time."""

import json

import pytest

from tests.dags.conftest import run_python

PARSE = """
import json, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1] if len(sys.argv) > 1 else None)
seconds = time.perf_counter() - t0
info = {dag_id: {"tags": sorted(dag.tags), "tasks": sorted(t.task_id for t in dag.tasks),
                 "retries": {t.task_id: t.retries for t in dag.tasks},
                 "pools": {t.task_id: t.pool for t in dag.tasks},
                 "timeouts": {t.task_id: t.execution_timeout.total_seconds() if t.execution_timeout else None
                              for t in dag.tasks},
                 "params": sorted(dag.params.keys()), "schedule": type(dag.timetable).__name__,
                 "mapped": sorted(t.task_id for t in dag.tasks if t.is_mapped)}
        for dag_id, dag in bag.dags.items()}
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": info,
                  "torch": "torch" in sys.modules, "pyarrow": "pyarrow" in sys.modules,
                  "recap_tasks": any(m.startswith("recap_tasks") for m in sys.modules),
                  "seconds": seconds}))
"""

STAGES = {"download", "ingest", "filter", "caption_units", "choose_runner", "caption_pod", "caption_local", "validate",
          "publish", "report"}


@pytest.fixture(scope="module")
def report(airflow_env) -> dict:
    proc = run_python(PARSE, airflow_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dags_import_without_errors_or_heavy_imports(report):
    assert report["errors"] == {}
    assert set(report["dags"]) == {"recap_pipeline", "recap_incremental", "recap_report"}
    assert not report["torch"] and not report["recap_tasks"] and not report["pyarrow"]
    assert report["seconds"] < 30, report["seconds"]
    for dag_id, dag in report["dags"].items():
        assert "recap" in dag["tags"], dag_id
        assert all(r >= 1 for t, r in dag["retries"].items() if t != "validate"), (dag_id, dag["retries"])
        assert all(s for s in dag["timeouts"].values()), (dag_id, dag["timeouts"])


def test_pipeline_shape_form_and_gpu_pool(report):
    dags = report["dags"]
    pipeline = dags["recap_pipeline"]
    assert set(pipeline["tasks"]) == STAGES | {"plan", "proceed"}
    assert set(pipeline["mapped"]) == {"ingest", "filter", "caption_pod", "caption_local"}
    assert {"source", "source_kind", "shard_limit", "lake", "model", "batch_size", "filter_profile", "runner",
            "dry_run"} == set(pipeline["params"])
    assert pipeline["retries"]["validate"] == 0  # a failed quality gate is a verdict
    # GPU work is capped by one pool whatever the runner.
    assert pipeline["pools"]["caption_pod"] == pipeline["pools"]["caption_local"] == "recap_gpu"
    assert pipeline["schedule"] == "NullTimetable"  # triggered from the UI form

    incremental = dags["recap_incremental"]
    assert set(incremental["tasks"]) == STAGES | {"find_new_shards", "has_work"}
    assert incremental["schedule"] not in ("NullTimetable", "AssetTriggeredTimetable")
    assert dags["recap_report"]["schedule"] == "AssetTriggeredTimetable"
