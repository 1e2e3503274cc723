"""Recaption new source shards as they land, on a schedule.

Each run lists the shards under `source` that the lake's ingest progress records do not
hold yet, and runs them through the same stages as `recap_pipeline`. Every stage skips work that is
done (ingested shards, filtered and captioned uids, published batches) and every write is keyed by
uid, so a run that starts late, runs twice, or overlaps a manual run publishes each uid once.

Schedule: `RECAP_INCREMENTAL_SCHEDULE` (cron or preset, default `@hourly`; `none` disables it).
Source: `RECAP_INCREMENTAL_SOURCE` (shards, or URL metadata with source kind `metadata`: the
mapped `download` task fetches what is new into shards first). Backfill: the runs do not depend on their
logical date (a run processes whatever is new), so there is nothing to backfill per interval; to reprocess older data
trigger `recap_pipeline` with a source glob, or `airflow backfill create --dag-id recap_incremental
--from-date ... --to-date ...`, which is safe for the same reasons.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import Param, dag, task

from recap_airflow.dag_parts import (DEFAULT_ARGS, common_params, download_task, max_work_units, recaption_stages,
                                     run_context)

SCHEDULE = os.environ.get("RECAP_INCREMENTAL_SCHEDULE", "@hourly")


@dag(
    dag_id="recap_incremental",
    schedule=None if SCHEDULE.lower() in ("", "none") else SCHEDULE,
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=24),
    tags=["recap", "incremental"],
    doc_md=__doc__,
    default_args=DEFAULT_ARGS,
    params={
        "source": Param(os.environ.get("RECAP_INCREMENTAL_SOURCE", ""), type="string", title="Source",
                        description="Folder or glob that new shards land in (RECAP_INCREMENTAL_SOURCE)"),
        "shard_limit": Param(0, type=["null", "integer"], minimum=0, title="Shard limit",
                             description="At most this many new shards per run (0: all); the rest wait"),
        **common_params(scheduled=True),
    },
)
def recap_incremental():
    @task
    def find_new_shards(source: str) -> list[list[str]]:
        """Shards the lake has not ingested (new or changed), as work units."""
        from recap_airflow import stages

        params, run_id, _ = run_context()
        config = stages.effective_config(profile=params["filter_profile"], batch_size=params["batch_size"])
        return stages.plan(source=source, lake=params["lake"], shard_limit=params["shard_limit"],
                           max_chunks=max_work_units(), only_new=True, model=params["model"], run_id=run_id,
                           config=config)

    @task.short_circuit
    def has_work(chunks: list[list[str]]) -> bool:
        """New shards, or rows an earlier run left between ingest and publish."""
        from recap_tasks.lake import Lake
        from recap_tasks.status import lake_status

        params, _, _ = run_context()
        if chunks:
            return True
        lake = Lake(params["lake"])
        return lake.exists() and lake_status(lake)["in_flight"] > 0

    chunks = find_new_shards(download_task(unconfigured=(
        "recap_incremental is not configured: set RECAP_INCREMENTAL_SOURCE and RECAP_MODEL for the Airflow "
        "services (or trigger it with source and model)")))
    first, _ = recaption_stages(chunks)
    has_work(chunks) >> first


recap_incremental()
