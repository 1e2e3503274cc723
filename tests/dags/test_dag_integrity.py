"""Every DAG imports cleanly and cheaply: without heavy libraries, recap_tasks or data reads at parse time.

"Cheaply" is checked by what parsing loads and opens, not by a wall time (the time the dag-processor
spends per parse depends on the machine and its load): no torch, transformers, pyarrow, numpy,
pandas, Dask, deltalake or PIL, no recap_tasks, and no file opened outside the Python installation,
the dags and plugins folders and the Airflow home.
"""

import json

import pytest

from tests.dags.conftest import run_python

PARSE = """
import json, os, sys
from airflow.dag_processing.dagbag import DagBag
HEAVY = ("torch", "transformers", "pyarrow", "numpy", "pandas", "dask", "deltalake", "PIL")
opened, recording = [], True
def audit(event, args):
    if recording and event == "open" and isinstance(args[0], (str, bytes)):
        opened.append(os.path.realpath(os.fsdecode(args[0])))
sys.addaudithook(audit)  # from here on: what parsing the DAG files opens (a hook cannot be removed)
bag = DagBag(dag_folder=sys.argv[1] if len(sys.argv) > 1 else None)
recording = False
info = {dag_id: {"tags": sorted(dag.tags), "tasks": sorted(t.task_id for t in dag.tasks),
                 "retries": {t.task_id: t.retries for t in dag.tasks},
                 "pools": {t.task_id: t.pool for t in dag.tasks},
                 "timeouts": {t.task_id: t.execution_timeout.total_seconds() if t.execution_timeout else None
                              for t in dag.tasks},
                 "params": sorted(dag.params.keys()), "schedule": type(dag.timetable).__name__,
                 "mapped": sorted(t.task_id for t in dag.tasks if t.is_mapped),
                 "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}}
        for dag_id, dag in bag.dags.items()}
roots = [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.environ["AIRFLOW_HOME"],
                                       os.environ["AIRFLOW__CORE__DAGS_FOLDER"],
                                       os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"])]
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": info,
                  "heavy": sorted(m for m in HEAVY if m in sys.modules),
                  "recap_tasks": any(m.startswith("recap_tasks") for m in sys.modules),
                  "opened_elsewhere": sorted({p for p in opened
                                              if not any(p == r or p.startswith(r + os.sep) for r in roots)})}))
"""

STAGES = {"plan_download", "download", "gather_downloads", "ingest", "filter", "caption_units", "choose_runner",
          "caption_pod", "caption_dask", "caption_local", "validate", "publish", "report"}


@pytest.fixture(scope="module")
def report(airflow_env) -> dict:
    proc = run_python(PARSE, airflow_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dags_import_without_errors_or_heavy_imports(report):
    assert report["errors"] == {}
    assert set(report["dags"]) == {"recap_pipeline", "recap_incremental", "recap_report"}
    assert report["heavy"] == [] and not report["recap_tasks"]
    assert report["opened_elsewhere"] == []  # no data, lake or config read while parsing
    for dag_id, dag in report["dags"].items():
        assert "recap" in dag["tags"], dag_id
        assert all(r >= 1 for t, r in dag["retries"].items() if t != "validate"), (dag_id, dag["retries"])
        assert all(s for s in dag["timeouts"].values()), (dag_id, dag["timeouts"])


def test_pipeline_shape_form_and_gpu_pool(report):
    dags = report["dags"]
    pipeline = dags["recap_pipeline"]
    assert set(pipeline["tasks"]) == STAGES | {"plan", "proceed"}
    assert set(pipeline["mapped"]) == {"download", "ingest", "filter", "caption_pod", "caption_dask", "caption_local"}
    assert {"source", "source_kind", "shard_limit", "lake", "model", "batch_size", "filter_profile", "runner",
            "dry_run"} == set(pipeline["params"])
    assert pipeline["retries"]["validate"] == 0  # a failed quality gate is a verdict
    # GPU work is capped by one pool whatever the runner.
    assert (pipeline["pools"]["caption_pod"] == pipeline["pools"]["caption_dask"] == pipeline["pools"]["caption_local"]
            == "recap_gpu")
    assert pipeline["schedule"] == "NullTimetable"  # triggered from the UI form

    incremental = dags["recap_incremental"]
    assert set(incremental["tasks"]) == STAGES | {"find_new_shards", "has_work"}
    assert incremental["schedule"] not in ("NullTimetable", "AssetTriggeredTimetable")
    assert dags["recap_report"]["schedule"] == "AssetTriggeredTimetable"


@pytest.mark.parametrize("dag_id", ["recap_pipeline", "recap_incremental"])
def test_the_task_chain_follows_the_declared_stage_order(report, dag_id):
    """Each stage's task runs after the task of the stage declared before it (recap_tasks.stages):
    the DAG files cannot import the declaration at parse time, so this test holds them to it."""
    from recap_tasks import stages

    upstream = report["dags"][dag_id]["upstream"]
    entry = {"caption": "caption_units"}  # the caption stage is a small task group

    def before(task: str) -> set[str]:
        seen, todo = set(), list(upstream[task])
        while todo:
            t = todo.pop()
            if t not in seen:
                seen.add(t)
                todo.extend(upstream[t])
        return seen

    chain = [entry.get(s.name, s.name) for s in stages.STAGES if entry.get(s.name, s.name) in upstream]
    assert len(chain) == len(stages.STAGES), chain  # every stage is a task
    for earlier, later in zip(chain, chain[1:]):
        assert earlier in before(later), (dag_id, earlier, later)
