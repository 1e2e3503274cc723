"""Quality reports inside the Airflow UI: a FastAPI app served by the api-server, a "Quality report"
tab on every run of the recap DAGs, and a "Recap reports" entry in the navigation.

The app only serves the HTML files the `report` tasks wrote (their paths come from the task's
XCom, or the index under RECAP_LAKE); it needs the same authentication as the UI (the UI's
cookie in the embedded view) and read access to the DAG's runs.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag, requires_authenticated

URL_PREFIX = "/recap"
REPORT_TASK = "report"

app = FastAPI(title="Recap quality reports", description=__doc__)


def report_of_run(session, dag_id: str, run_id: str) -> dict | None:
    """What the run's `report` task returned (its XCom), if it has run."""
    from airflow.models.xcom import XComModel

    row = session.scalars(XComModel.get_many(run_id=run_id, key="return_value", task_ids=REPORT_TASK,
                                             dag_ids=dag_id, limit=1)).first()
    if row is None:
        return None
    value = XComModel.deserialize_value(row)
    return value if isinstance(value, dict) else None


def report_path_of_run(session, dag_id: str, run_id: str) -> str | None:
    """Where the run's `report` task wrote its HTML (from its XCom), if it has run."""
    return (report_of_run(session, dag_id, run_id) or {}).get("report")


def _reports_root() -> Path:
    """The `_reports` folder of the deployment's lake (RECAP_LAKE)."""
    return (Path(os.environ.get("RECAP_LAKE", os.path.expanduser("~/recap-lake"))) / "_reports").resolve()


def _in_reports(path: str | os.PathLike[str]) -> str | None:
    """`path` relative to RECAP_LAKE/_reports when it lies inside it."""
    try:
        return Path(path).resolve().relative_to(_reports_root()).as_posix()
    except ValueError:
        return None


def _serve(path: str | os.PathLike[str] | None) -> HTMLResponse | None:
    # Only report pages: a self-contained .html file inside a lake's _reports folder.
    if not path:
        return None
    p = Path(path)
    if p.suffix != ".html" or "_reports" not in p.parts or not p.is_file():
        return None
    return HTMLResponse(p.read_text(encoding="utf-8"))


def _missing(title: str, detail: str, *, extra: str = "", status: int = 404) -> HTMLResponse:
    body = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif;margin:2em'><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(detail)}{extra}</p><p><a href='{URL_PREFIX}/reports'>All reports</a></p></body></html>")
    return HTMLResponse(body, status_code=status)


@app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse,
         dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))])
def run_report(dag_id: str, run_id: str, session: SessionDep):
    """The quality report of one DAG run; a run without one says why (failed, or still running)."""
    reported = report_of_run(session, dag_id, run_id) or {}
    if reported.get("nothing_new"):  # validate found nothing new: no batch, so no report
        return _missing(f"Nothing new in run {run_id}", reported.get("note") or "no batch was validated",
                        status=200)
    path = reported.get("report")
    rel = _in_reports(path) if path else None
    if rel is not None and (_reports_root() / rel).is_file():
        # Served from the lake's report tree, so its links (all runs, Data Docs) resolve.
        return RedirectResponse(f"{URL_PREFIX}/lake/{quote(rel)}", status_code=307)
    page = _serve(path)
    if page is not None:
        return page
    return _no_report(session, dag_id, run_id)


def _no_report(session, dag_id: str, run_id: str) -> HTMLResponse:
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance

    run = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one_or_none()
    state = str(getattr(run, "state", "") or "").lower()
    if state.endswith("failed"):
        failed = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id,
                                                    TaskInstance.state == "failed").all()
        links = ", ".join(
            f"<a target='_top' href='/dags/{quote(dag_id)}/runs/{quote(run_id, safe='')}/tasks/{quote(t.task_id)}"
            f"{'' if t.map_index < 0 else f'/mapped/{t.map_index}'}'>{html.escape(t.task_id)}"
            f"{'' if t.map_index < 0 else f'[{t.map_index}]'}</a>" for t in failed) or "none recorded"
        return _missing(f"Run {run_id} failed", "It failed before its quality report was written. Failed tasks: ",
                        extra=links, status=200)
    return _missing("No quality report yet",
                    f"Run {run_id} of {dag_id} is {state or 'not known'}: its `report` task has not finished.")


@app.get("/reports", dependencies=[Depends(requires_authenticated())])
def report_index():
    """The index of every run's report in the default lake (RECAP_LAKE)."""
    if not (_reports_root() / "index.html").is_file():
        return _missing("No reports yet", f"No report index in {_reports_root().parent}: publish a run first.")
    return RedirectResponse(f"{URL_PREFIX}/lake/index.html", status_code=307)


_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".png": "image/png",
          ".svg": "image/svg+xml", ".json": "application/json", ".woff": "font/woff", ".woff2": "font/woff2",
          ".ttf": "font/ttf", ".ico": "image/x-icon"}


@app.get("/lake/{path:path}", dependencies=[Depends(requires_authenticated())])
def lake_report_file(path: str):
    """A file of RECAP_LAKE/_reports (index, run reports, Data Docs and its assets), nothing outside."""
    root = _reports_root()
    target = (root / path).resolve()
    if target.suffix not in _TYPES or not target.is_relative_to(root) or not target.is_file():
        return _missing("Not found", f"No report file {path!r} in {root}.")
    return FileResponse(target, media_type=_TYPES[target.suffix])


def plugin_spec() -> dict:
    """What the AirflowPlugin registers (kept here so tests can check it without the plugin manager)."""
    return {
        "fastapi_apps": [{"app": app, "url_prefix": URL_PREFIX, "name": "Recap quality reports"}],
        "external_views": [
            {"name": "Quality report", "href": f"{URL_PREFIX}/runs/{{DAG_ID}}/{{RUN_ID}}", "destination": "dag_run",
             "url_route": "recap-quality-report"},
            {"name": "Recap reports", "href": f"{URL_PREFIX}/reports", "destination": "nav", "category": "browse",
             "url_route": "recap-reports"},
        ],
    }
