"""End to end with real Airflow services on PostgreSQL: runs triggered through the REST API."""

import html
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


def test_rest_triggered_run_publishes_and_links_its_report(airflow_services, sample_shards, tiny_model):
    af = airflow_services
    # The walkthrough's conf through the REST API (test_ui_browser.py submits the form itself): only
    # the source; lake, model, runner, batch size and filter chain are the form's defaults
    # (RECAP_LAKE, RECAP_MODEL, RECAP_RUNNER, RECAP_CONFIG with chain datacomp).
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


def test_publish_event_triggers_the_report_dag(airflow_services, sample_shards, tiny_model, tmp_path):
    """A publish emits `recap_published` naming its lake and run; recap_report, scheduled on that
    asset, rebuilds that lake's report index. The test makes its own publish (one shard, a lake of
    its own) and waits for the report run its event created, whatever other tests ran before."""
    af = airflow_services
    lake = tmp_path / "lake"
    conf = {"source": str(sample_shards / "00000.tar"), "lake": str(lake), "model": str(tiny_model),
            "runner": "local"}
    run_id = af.trigger("recap_pipeline", conf)
    run = af.wait_run("recap_pipeline", run_id)
    assert run["state"] == "success" and run["tasks"]["publish[-1]"] == "success", (run, af.logs())
    # The publish's event names the lake and the run; the scheduler creates the report run from it.
    query = f"/api/v2/assets/events?source_dag_id=recap_pipeline&source_run_id={urllib.request.quote(run_id, safe='')}"
    deadline = time.monotonic() + 300
    while True:
        events = af.request("GET", query)["asset_events"]
        created = [r for e in events for r in e["created_dagruns"] if r["dag_id"] == "recap_report"]
        if created:
            break
        assert time.monotonic() < deadline, f"no recap_report run created for {run_id}: {events}\n{af.logs()}"
        time.sleep(3)
    assert [e["name"] for e in events] == ["recap_published"], events
    assert events[0]["extra"]["lake"] == str(lake) and events[0]["extra"]["run_id"] == run_id, events
    report_run = af.wait_run("recap_report", created[0]["run_id"], timeout=300)
    assert report_run["state"] == "success", (report_run, af.logs())
    assert report_run["run_type"] == "asset_triggered"
    index = (lake / "_reports" / "index.html").read_text()
    assert "<html" in index.lower()[:2000] and run_id in html.unescape(index)


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
