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

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag, requires_authenticated

URL_PREFIX = "/recap"
REPORT_TASK = "report"

app = FastAPI(title="Recap quality reports", description=__doc__)


def report_path_of_run(session, dag_id: str, run_id: str) -> str | None:
    """Where the run's `report` task wrote its HTML (from its XCom), if it has run."""
    from airflow.models.xcom import XComModel

    row = session.scalars(XComModel.get_many(run_id=run_id, key="return_value", task_ids=REPORT_TASK,
                                             dag_ids=dag_id, limit=1)).first()
    if row is None:
        return None
    value = XComModel.deserialize_value(row)
    return value.get("report") if isinstance(value, dict) else None


def _serve(path: str | os.PathLike[str] | None) -> HTMLResponse | None:
    # Only report pages: a self-contained .html file inside a lake's _reports folder.
    if not path:
        return None
    p = Path(path)
    if p.suffix != ".html" or "_reports" not in p.parts or not p.is_file():
        return None
    return HTMLResponse(p.read_text(encoding="utf-8"))


def _missing(title: str, detail: str) -> HTMLResponse:
    body = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif;margin:2em'><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(detail)}</p></body></html>")
    return HTMLResponse(body, status_code=404)


@app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse,
         dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))])
def run_report(dag_id: str, run_id: str, session: SessionDep) -> HTMLResponse:
    """The quality report of one DAG run."""
    page = _serve(report_path_of_run(session, dag_id, run_id))
    if page is None:
        return _missing("No quality report yet",
                        f"Run {run_id} of {dag_id} has no report: its `report` task has not finished.")
    return page


@app.get("/reports", response_class=HTMLResponse, dependencies=[Depends(requires_authenticated())])
def report_index() -> HTMLResponse:
    """The index of every run's report in the default lake (RECAP_LAKE)."""
    lake = os.environ.get("RECAP_LAKE", os.path.expanduser("~/recap-lake"))
    page = _serve(Path(lake) / "_reports" / "index.html")
    if page is None:
        return _missing("No reports yet", f"No report index in {lake}: publish a run first.")
    return page


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
