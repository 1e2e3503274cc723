"""Recaption a set of source shards: ingest -> filter -> caption -> validate -> publish."""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import Param, dag, get_current_context, task

DEFAULT_LAKE = os.environ.get("RECAP_LAKE", os.path.expanduser("~/recap-lake"))
DEFAULT_MODEL = os.environ.get("RECAP_MODEL", "")


def _params() -> tuple[dict, str]:
    context = get_current_context()
    from recap_airflow.stages import recap_run_id

    return context["params"], recap_run_id(context["run_id"])


@dag(
    dag_id="recap_pipeline",
    schedule=None,
    catchup=False,
    tags=["recap"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "execution_timeout": timedelta(hours=6)},
    params={
        "source": Param("", type="string", minLength=1,
                        description="Folder, glob or file(s) of webdataset .tar or .parquet shards (comma-separated)"),
        "lake": Param(DEFAULT_LAKE, type="string", description="Lake root folder"),
        "model": Param(DEFAULT_MODEL, type="string", minLength=1, description="Captioning model id or local path"),
        "batch_size": Param(8, type="integer", minimum=1, maximum=1024, description="Images per generate() call"),
        "runner": Param("local", enum=["local"], description="Where the caption stage runs"),
    },
)
def recap_pipeline():
    @task
    def ingest() -> dict:
        from recap_airflow import stages

        params, run_id = _params()
        return stages.ingest(source=params["source"], lake=params["lake"], run_id=run_id)

    @task(task_id="filter")
    def filter_pairs() -> dict:
        from recap_airflow import stages

        params, run_id = _params()
        return stages.filter_pairs(lake=params["lake"], run_id=run_id)

    @task(execution_timeout=timedelta(hours=24))
    def caption() -> None:
        from recap_airflow import stages

        params, run_id = _params()
        stages.caption(lake=params["lake"], model=params["model"], run_id=run_id,
                       batch_size=params["batch_size"], runner=params["runner"])

    @task(retries=0)  # a failed quality gate is a verdict, not a transient error
    def validate() -> dict:
        from recap_airflow import stages

        params, run_id = _params()
        return stages.validate(lake=params["lake"], run_id=run_id)

    @task
    def publish() -> dict:
        from recap_airflow import stages

        params, run_id = _params()
        return stages.publish(lake=params["lake"], run_id=run_id)

    ingest() >> filter_pairs() >> caption() >> validate() >> publish()


recap_pipeline()
