"""Quality reports inside the Airflow UI: a FastAPI app served by the api-server, a "Quality report"
tab on every run of the recap DAGs, and a "Recap reports" entry in the navigation.

The app only serves the HTML files the `report` tasks wrote (their paths come from the task's
XCom, or the index under RECAP_LAKE); it needs the same authentication as the UI (the UI's
cookie in the embedded view) and read access to the DAG's runs.
"""

from __future__ import annotations

import html
import json
import os
import re
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
            f"<p>{html.escape(detail)}</p>{extra}<p><a href='{URL_PREFIX}/reports'>All reports</a></p></body></html>")
    return HTMLResponse(body, status_code=status)


@app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse,
         dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))])
def run_report(dag_id: str, run_id: str, session: SessionDep):
    """The quality report of one DAG run; a run without one says why (failed, or still running)."""
    reported = report_of_run(session, dag_id, run_id) or {}
    if reported.get("nothing_new"):  # validate found nothing new: no batch, so no report
        note = reported.get("note") or "no batch was validated"
        note = note.removeprefix(f"nothing new in run {reported.get('run_id') or run_id}: ")
        return _missing(f"Nothing new in run {run_id}", f"There is no quality report: {note}.", status=200)
    path = reported.get("report")
    rel = _in_reports(path) if path else None
    if rel is not None and (_reports_root() / rel).is_file():
        # Served from the lake's report tree, so its links (all runs, Data Docs) resolve.
        return RedirectResponse(f"{URL_PREFIX}/lake/{quote(rel)}", status_code=307)
    page = _serve(path)
    if page is not None:
        return page
    return _no_report(session, dag_id, run_id)


# The one-line error of a failed task, as recap writes it: `recap: ...` (stages.fail_fast) or a CLI's
# `recap caption: error: ...`.
_RECAP_ERROR = re.compile(r"^recap(?: [\w-]+)?: (?:error: )?\S")
# Opens an Airflow UI page from the embedded view: the view's frame is sandboxed without
# allow-top-navigation, so the link asks the UI's router (same origin) to navigate instead.
_OPEN_IN_UI = ("if(window.top!==window){try{window.top.history.pushState({},'',this.getAttribute('href'));"
               "window.top.dispatchEvent(new PopStateEvent('popstate',{state:{}}));return false}catch(e){}}"
               "return true")


def _task_log_files(dag_id: str, run_id: str, task_id: str, map_index: int) -> list[Path]:
    """The task's log files in this deployment's log folder, oldest attempt first."""
    from airflow.configuration import conf

    folder = Path(conf.get("logging", "base_log_folder")) / f"dag_id={dag_id}" / f"run_id={run_id}" / \
        f"task_id={task_id}"
    if map_index >= 0:
        folder = folder / f"map_index={map_index}"
    return sorted(folder.glob("attempt=*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))


def failure_line(lines) -> str | None:
    """The one-line error of a failed task's log (JSON lines or plain text): the last `recap ...`
    error line, else the message of the exception the task failed with."""
    found = exception = None
    for raw in lines:
        raw = raw.strip()
        try:
            record = json.loads(raw) if raw.startswith("{") else {"event": raw}
        except ValueError:
            record = {"event": raw}
        event = str(record.get("event") or "").strip()
        first = event.splitlines()[0] if event else ""
        if _RECAP_ERROR.match(first) and (record.get("level") in (None, "error", "critical") or ": error: " in first):
            found = first
        for detail in record.get("error_detail") or []:
            if isinstance(detail, dict) and detail.get("exc_value"):
                exception = f"{detail.get('exc_type')}: {str(detail['exc_value']).splitlines()[0]}"
                break
    return found or exception


def task_error(dag_id: str, run_id: str, task_id: str, map_index: int) -> str | None:
    files = _task_log_files(dag_id, run_id, task_id, map_index)
    if not files:
        return None
    try:
        return failure_line(files[-1].read_text(encoding="utf-8", errors="replace").splitlines())
    except OSError:
        return None


def _task_href(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    return (f"/dags/{quote(dag_id)}/runs/{quote(run_id, safe='')}/tasks/{quote(task_id)}"
            f"{'' if map_index < 0 else f'/mapped/{map_index}'}")


def _no_report(session, dag_id: str, run_id: str) -> HTMLResponse:
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance

    run = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one_or_none()
    state = str(getattr(run, "state", "") or "").lower()
    tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id).all()
    if state.endswith("failed"):
        # The tasks that failed, not those skipped for it (upstream_failed: no error of their own).
        failed = [t for t in tis if str(t.state or "").lower().endswith("failed")
                  and not str(t.state or "").lower().endswith("upstream_failed")]
        items = []
        for t in failed:
            name = f"{t.task_id}{'' if t.map_index < 0 else f'[{t.map_index}]'}"
            error = task_error(dag_id, run_id, t.task_id, t.map_index)
            href = _task_href(dag_id, run_id, t.task_id, t.map_index)
            items.append(f"<li><a class='task-log' target='_top' href='{html.escape(href)}' "
                         f"onclick=\"{_OPEN_IN_UI}\" title='open its log'>{html.escape(name)}</a>: "
                         f"<code class='error'>{html.escape(error or 'no error line found in its log')}</code>"
                         f"</li>")
        extra = f"<ul>{''.join(items)}</ul>" if items else " none recorded."
        return _missing(f"Run {run_id} failed", "It failed before its quality report was written. Failed tasks:",
                        extra=extra, status=200)
    states = {t.task_id: str(t.state or "").lower() for t in tis if t.map_index < 0}
    if state.endswith("success") and states.get(REPORT_TASK, "").endswith("skipped"):
        # A short-circuit (no new shards) or a publish with nothing to publish skipped the report.
        return _missing(f"Nothing new in run {run_id}",
                        "The run found no new data to recaption, so there is no batch and no quality report; "
                        "every stage after the check was skipped.", status=200)
    return _missing("No quality report yet",
                    f"Run {run_id} of {dag_id} is {state or 'not known'}: its report task has not finished.")


@app.get("/reports", dependencies=[Depends(requires_authenticated())])
def report_index():
    """The index of every run's report in the default lake (RECAP_LAKE)."""
    if not (_reports_root() / "index.html").is_file():
        return _missing("No reports yet", f"No report index in {_reports_root().parent}: publish a run first.")
    return RedirectResponse(f"{URL_PREFIX}/lake/index.html", status_code=307)


_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".png": "image/png",
          ".svg": "image/svg+xml", ".json": "application/json", ".woff": "font/woff", ".woff2": "font/woff2",
          ".ttf": "font/ttf", ".otf": "font/otf", ".ico": "image/x-icon", ".gif": "image/gif"}


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
