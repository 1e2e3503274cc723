"""End to end with real Airflow services on PostgreSQL: runs triggered through the REST API."""

import shutil
import time
import urllib.error
import urllib.request

import pyarrow.compute as pc
import pytest

from recap_tasks import lake as tables
from recap_tasks.lake import Lake
from recap_tasks.status import lake_status

pytestmark = pytest.mark.slow


def _published_uids(lake) -> list[str]:
    return Lake(lake).read(tables.RECAP, ["uid"]).column("uid").to_pylist()


def test_ui_triggered_run_publishes_and_links_its_report(airflow_services, sample_shards, tiny_model):
    af = airflow_services
    # The walkthrough's form: only the source; lake, model, runner, batch size and filter chain are
    # the form's defaults (RECAP_LAKE, RECAP_MODEL, RECAP_RUNNER, RECAP_CONFIG with chain datacomp).
    conf = {"source": f"{sample_shards}/*.tar"}
    run_id = af.trigger("recap_pipeline", conf)
    run = af.wait_run("recap_pipeline", run_id)
    assert run["state"] == "success", (run, af.logs())
    assert run["conf"] == conf
    assert run["tasks"]["caption_local[0]"] == run["tasks"]["caption_local[1]"] == "success"
    assert run["tasks"]["caption_pod[-1]"] == "skipped"
    # Each filter task ran its rows on a Dask LocalCluster of its own (issue 14).
    filter_logs = [p.read_text(errors="replace") for p in (af.home / "logs").rglob("*.log")
                   if f"run_id={run_id}" in str(p) and "task_id=filter" in str(p)]
    assert len(filter_logs) == 2 and all("starting a LocalCluster" in text for text in filter_logs), filter_logs

    status = lake_status(Lake(af.lake))
    assert status["published"] == 18 and status["balanced"]
    uids = _published_uids(af.lake)
    assert len(uids) == len(set(uids)) == 18
    run_ids = set(Lake(af.lake).read(tables.RECAP, ["publish_run_id"]).column("publish_run_id").to_pylist())
    assert len(run_ids) == 1 and run_ids.pop().startswith("manual__")

    # The run's report task wrote the HTML; the UI plugin serves it for this run, behind Airflow's auth.
    xcom = af.request("GET", f"/api/v2/dags/recap_pipeline/dagRuns/{urllib.request.quote(run_id, safe='')}"
                             "/taskInstances/report/xcomEntries/return_value")
    assert xcom["value"]["report"].endswith("report.html")
    page = af.request("GET", f"/recap/runs/recap_pipeline/{urllib.request.quote(run_id, safe='')}", raw=True)
    assert b"<html" in page.lower()[:2000] and len(page) > 1000
    # The run's effective configuration is saved with it and shown in its report.
    assert "chain: datacomp" in (Lake(af.lake).read_bytes(f"_runs/{run_id}/config.yaml") or b"").decode()
    assert b"<h2>Configuration</h2>" in page
    with pytest.raises(urllib.error.HTTPError) as denied:
        af.request("GET", f"/recap/runs/recap_pipeline/{urllib.request.quote(run_id, safe='')}", auth=False)
    assert denied.value.code in (401, 403)
    plugins = af.request("GET", "/api/v2/plugins")["plugins"]
    views = {v["name"]: v for p in plugins for v in p["external_views"]}
    assert views["Quality report"]["destination"] == "dag_run"
    assert views["Quality report"]["href"] == "/recap/runs/{DAG_ID}/{RUN_ID}"


def test_publish_event_triggers_the_report_dag(airflow_services):
    af = airflow_services
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = af.request("GET", "/api/v2/dags/recap_report/dagRuns?limit=10")["dag_runs"]
        if any(r["state"] == "success" for r in runs):
            break
        if any(r["state"] == "failed" for r in runs):
            pytest.fail(f"recap_report failed: {runs}\n{af.logs()}")
        time.sleep(3)
    else:
        pytest.fail(f"recap_report never ran after a publish\n{af.logs()}")
    assert runs[0]["run_type"] == "asset_triggered"
    assert (af.lake / "_reports" / "index.html").is_file()
    assert b"<html" in af.request("GET", "/recap/reports", raw=True).lower()[:2000]


def test_incremental_runs_publish_each_uid_once(airflow_services, sample_shards, tiny_model, tmp_path):
    af = airflow_services
    incoming, lake = tmp_path / "incoming", tmp_path / "lake"
    incoming.mkdir()
    conf = {"source": str(incoming), "lake": str(lake), "model": str(tiny_model), "batch_size": 4}

    shutil.copy2(sample_shards / "00000.tar", incoming)
    first = af.wait_run("recap_incremental", af.trigger("recap_incremental", conf))
    assert first["state"] == "success", (first, af.logs())
    after_first = _published_uids(lake)
    assert len(after_first) == len(set(after_first)) > 0

    # New data lands; an incremental run and a manual run over the same folder overlap.
    shutil.copy2(sample_shards / "00001.tar", incoming)
    runs = [("recap_incremental", af.trigger("recap_incremental", conf)),
            ("recap_pipeline", af.trigger("recap_pipeline", {**conf, "runner": "local"}))]
    for dag_id, run_id in runs:
        run = af.wait_run(dag_id, run_id)
        assert run["state"] == "success", (dag_id, run, af.logs())

    # Run again with nothing new: it short-circuits and publishes nothing.
    third = af.wait_run("recap_incremental", af.trigger("recap_incremental", conf))
    assert third["state"] == "success"
    assert third["tasks"]["has_work[-1]"] == "success" and third["tasks"]["publish[-1]"] == "skipped"

    uids = _published_uids(lake)
    assert len(uids) == len(set(uids)) == 18  # every uid of both shards, each once
    assert set(after_first) < set(uids)
    status = lake_status(Lake(lake))
    assert status["balanced"] and status["in_flight"] == 0
    captions = Lake(lake).read(tables.CAPTIONS, ["uid"]).column("uid")
    assert len(pc.unique(captions)) == len(captions)


def test_a_bad_source_fails_once_in_plan_and_the_tab_says_so(airflow_services, tiny_model, tmp_path):
    af = airflow_services
    conf = {"source": str(tmp_path / "no-such-folder"), "lake": str(af.lake), "model": str(tiny_model),
            "runner": "local"}
    run_id = af.trigger("recap_pipeline", conf)
    run = af.wait_run("recap_pipeline", run_id, timeout=300)
    assert run["state"] == "failed" and run["tasks"]["plan[-1]"] == "failed", run
    quoted = urllib.request.quote(run_id, safe="")
    ti = af.request("GET", f"/api/v2/dags/recap_pipeline/dagRuns/{quoted}/taskInstances/plan")
    assert ti["try_number"] == 1  # a user error is not retried
    page = af.request("GET", f"/recap/runs/recap_pipeline/{quoted}", raw=True).decode()
    assert f"Run {run_id} failed" in page and ">plan</a>" in page
