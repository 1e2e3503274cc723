"""Stage callables for DAG tasks: thin wrappers over recap_tasks, imported lazily inside tasks."""

from __future__ import annotations

import re

from recap_airflow.runners import caption_command, run_local


def recap_run_id(airflow_run_id: str) -> str:
    """Airflow's run id (`manual__2026-11-27T03:00:00+00:00`) as a file-name-safe recap run id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", airflow_run_id).strip("-")


def ingest(*, source: str, lake: str, run_id: str) -> dict:
    from recap_tasks.ingest import ingest as ingest_sources
    from recap_tasks.lake import Lake

    sources = [s for s in re.split(r"[\s,]+", source) if s]
    return ingest_sources(sources, Lake(lake), run_id=run_id).summary()


def filter_pairs(*, lake: str, run_id: str) -> dict:
    from recap_tasks.filtering import run_filter
    from recap_tasks.lake import Lake

    return run_filter(Lake(lake), run_id=run_id).summary()


def caption(*, lake: str, model: str, run_id: str, batch_size: int | None, runner: str) -> str:
    if runner != "local":
        raise ValueError(f"runner {runner!r} is not available yet (only 'local')")
    return run_local(caption_command(lake=lake, model=model, run_id=run_id, batch_size=batch_size))


def validate(*, lake: str, run_id: str) -> dict:
    from recap_tasks.lake import Lake
    from recap_tasks.validate import run_validate

    return run_validate(Lake(lake), run_id=run_id).summary()


def publish(*, lake: str, run_id: str) -> dict:
    from recap_tasks.lake import Lake
    from recap_tasks.publish import run_publish

    return run_publish(Lake(lake), batch_id=run_id, run_id=run_id).summary()
