"""Rebuild the lake's quality report index whenever the published table changes.

Scheduled on the `recap_published` asset: every successful publish (manual or incremental run)
emits an event whose `extra` names the lake and the run; this DAG refreshes that lake's report
index (`LAKE/_reports/index.html`), which the Airflow UI shows under Browse -> Recap reports.
"""

from __future__ import annotations

from airflow.sdk import dag, get_current_context, task

from recap_airflow.dag_parts import DEFAULT_ARGS, DEFAULT_LAKE, PUBLISHED


@dag(dag_id="recap_report", schedule=[PUBLISHED], catchup=False, max_active_runs=1, tags=["recap", "report"],
     doc_md=__doc__, default_args=DEFAULT_ARGS)
def recap_report():
    @task
    def report_index() -> list[dict]:
        from recap_airflow import stages

        events = get_current_context()["triggering_asset_events"]
        lakes = sorted({(e.extra or {}).get("lake") or DEFAULT_LAKE for evs in events.values() for e in evs}) \
            or [DEFAULT_LAKE]
        return [stages.report(lake=lake, run_id=None) for lake in lakes]

    report_index()


recap_report()
