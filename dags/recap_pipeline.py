"""Recaption a set of source shards, triggered from the UI form.

plan_download -> download -> gather_downloads (source kind `metadata`: image-URL parquet/CSV -> shards,
one mapped `download` instance per unit of shard jobs; else nothing) -> plan (list shards, group them
into work units) -> ingest, filter, caption (one mapped task per work unit; caption in a GPU pod or a
local subprocess) -> validate -> publish -> report.
With `dry_run` the run stops after `plan`, which logs the shards and the rendered caption pod.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from recap_airflow.dag_parts import (DEFAULT_ARGS, common_params, download_task, max_work_units, recaption_stages,
                                     run_context)
from recap_airflow.pods import CaptionRunnerFactory

FACTORY = CaptionRunnerFactory()


@dag(
    dag_id="recap_pipeline",
    schedule=None,
    catchup=False,
    max_active_runs=4,
    tags=["recap"],
    doc_md=__doc__,
    default_args=DEFAULT_ARGS,
    params={
        # No minLength: the form would flag the empty default as an error before anything is typed;
        # a run without a source fails at once in `plan` with one line saying so.
        "source": Param("", type="string", title="Source",
                        description="Folder, glob or file(s) of webdataset .tar or .parquet shards, or of URL "
                                    "metadata with source kind 'metadata' (comma-separated)"),
        "shard_limit": Param(0, type=["null", "integer"], minimum=0, title="Shard limit",
                             description="Process at most this many shards (0: all)"),
        **common_params(),
        "dry_run": Param(False, type=["null", "boolean"], title="Dry run",
                         description="Only list the shards and render the caption pod; write nothing"),
    },
)
def recap_pipeline():
    @task
    def plan(source: str) -> list[list[str]]:
        """The run's work units: shard paths, at most [core] max_map_length groups."""
        import json
        import logging

        from recap_airflow import stages
        from recap_airflow.runners import caption_arguments

        params, run_id, _ = run_context()
        if params["dry_run"] and not source:
            logging.getLogger(__name__).info("dry run of a metadata source: nothing downloaded, no shards to plan")
            return []
        config = stages.effective_config(profile=params["filter_profile"], batch_size=params["batch_size"])
        chunks = stages.plan(source=source, lake=params["lake"], shard_limit=params["shard_limit"],
                             max_chunks=max_work_units(), model=params["model"],
                             run_id=None if params["dry_run"] else run_id, config=config)
        if params["dry_run"] and chunks:
            from recap_tasks.ids import shard_id_for

            arguments = caption_arguments(lake=params["lake"], model=params["model"], run_id=run_id,
                                          shard_ids=[shard_id_for(p) for p in chunks[0]],
                                          batch_size=params["batch_size"])
            log = logging.getLogger(__name__)
            log.info("work units: %s", json.dumps(chunks, indent=1))
            if params["runner"] == "kubernetes":
                log.info("caption pod of the first unit:\n%s", json.dumps(FACTORY.render_pod(arguments),
                                                                         indent=1, default=str))
            else:
                log.info("caption command of the first unit: python -m recap_tasks %s", " ".join(arguments))
        return chunks

    @task.short_circuit
    def proceed() -> bool:
        params, _, _ = run_context()
        return not params["dry_run"]

    chunks = plan(download_task())
    first, _ = recaption_stages(chunks, factory=FACTORY)
    chunks >> proceed() >> first


recap_pipeline()
