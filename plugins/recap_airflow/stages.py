"""Stage callables for DAG tasks: thin wrappers over recap_tasks, imported lazily inside tasks.

Every function takes plain values (paths, ids) and returns a small JSON-able dict: Airflow passes
shard ids and paths between tasks, never data.
"""

from __future__ import annotations

import functools
import logging
import os
import re

log = logging.getLogger(__name__)

# Filter chains the run form offers: profiles in recap_tasks/configs/ (FilterConfig.chain), or
# "config": whatever filter.chain RECAP_CONFIG names.
FILTER_PROFILES = ("basic", "datacomp")
CONFIG_PROFILE = "config"


def effective_config(*, profile: str = CONFIG_PROFILE, batch_size: int | None = None):
    """RECAP_CONFIG with what the run form set explicitly (a field left at its default changes nothing)."""
    from recap_tasks.config import RecapConfig

    return RecapConfig.load(filter={"chain": None if profile in (None, "", CONFIG_PROFILE) else profile},
                            caption={"batch_size": batch_size})


def recap_run_id(airflow_run_id: str) -> str:
    """The recap run id of an Airflow run: Airflow's own id (`manual__2026-11-27T03:00:00+00:00`)
    when it is a valid recap name, so reports and rows carry the id the UI shows; else made safe."""
    from recap_tasks.errors import RecapError
    from recap_tasks.runs import check_name

    try:
        return check_name(airflow_run_id)
    except RecapError:
        return re.sub(r"[^A-Za-z0-9_.:+=-]+", "-", airflow_run_id).strip("-.")[:200] or "run"


def fail_fast(func):
    """A user error (RecapError: bad source, model, config; a refused batch) fails the task at once,
    without retries, its one-line message last in the log; anything else may be retried."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from airflow.sdk.exceptions import AirflowFailException

        from recap_tasks.errors import RecapError
        from recap_tasks.runs import quiet_libraries

        # Task logs as quiet as the CLI's: Recap's summary lines, library INFO only with RECAP_VERBOSE=1.
        quiet_libraries(os.environ.get("RECAP_VERBOSE") == "1")
        try:
            return func(*args, **kwargs)
        except RecapError as exc:
            log.error("recap: %s", exc)
            raise AirflowFailException(str(exc)) from exc

    return wrapper


@fail_fast
def plan(*, source: str, lake: str, shard_limit: int = 0, max_chunks: int, only_new: bool = False,
         model: str | None = None, run_id: str | None = None, config=None) -> list[list[str]]:
    """Shard paths under `source`, grouped into at most `max_chunks` work units (max_map_length).

    Checks first that the source holds shards, the model can load and the lake is writable; saves
    the run's effective config (`config`, a RecapConfig) as `LAKE/_runs/<run id>/config.yaml`.
    """
    from recap_tasks.lake import Lake
    from recap_tasks.preflight import check_run
    from recap_tasks.shards import chunk, list_shards, shards_to_ingest

    check_run(source=source, lake=lake, model=model)
    if run_id and config is not None:
        Lake(lake).write_bytes(f"_runs/{run_id}/config.yaml", config.to_yaml().encode())

    from recap_tasks.config import RecapConfig

    limit = shard_limit or None
    dataset = (config or RecapConfig.load()).ingest.dataset
    shards = shards_to_ingest(Lake(lake), source, limit=limit, dataset=dataset) if only_new \
        else list_shards(source, limit=limit)
    chunks = chunk(shards, max_chunks=max_chunks)
    log.info("%d shards in %d work units", len(shards), len(chunks))
    return chunks


# The download, mapped over Airflow workers (source kind `metadata`) ------------------------------
#
# Politeness across task instances: `download.per_host_connections` holds per process, so one
# `recap download` opens at most per_host_connections x processes connections to a host at once.
# The mapped download keeps that bound for a DAG run: each `download` task instance runs its shards
# in one process and gets the bound divided by the instances that may run at once (the task's
# max_active_tis_per_dagrun, or fewer when there are fewer units), at least 1 each. Approximate:
# instances of other DAG runs (or a CLI download) are not counted, and a bound smaller than the
# number of instances still gives each instance 1.


def instance_connections(config, instances: int) -> int:
    """Per-host connections of each of `instances` download task instances running at once
    (`config`: the DownloadConfig), so that together they stay within one download's bound."""
    return max(1, config.per_host_connections * config.processes // max(1, instances))


def download_folders(source: str, lake: str) -> list[tuple[str, str]]:
    """(metadata file, its download folder) for each metadata file of `source`: one folder per file
    under RECAP_DOWNLOAD_DIR, else LAKE/_downloads (local or s3://), kept across runs (a rerun resumes)."""
    import hashlib
    import posixpath

    from recap_tasks import storage
    from recap_tasks.lake import Lake
    from recap_tasks.shards import split_sources
    from recap_tasks.stages.download import list_metadata

    root = os.environ.get("RECAP_DOWNLOAD_DIR") or storage.join(Lake(lake).uri, "_downloads")
    return [(f, storage.join(root, f"{posixpath.splitext(posixpath.basename(f))[0]}-"
                                   f"{hashlib.sha1(f.encode()).hexdigest()[:8]}"))
            for f in list_metadata(split_sources(source))]


@fail_fast
def plan_download(*, source: str, source_kind: str, lake: str, max_units: int, instances: int,
                  dry_run: bool = False) -> dict:
    """The download's work: {"source": what `plan` reads after it, "units": one per `download` task instance}.

    Kind `shards`: the source as is and no units. Kind `metadata`: the download folders, and the
    unfinished shard jobs of every metadata file (one listing per folder: download.pending) grouped
    into at most `max_units` units (max_map_length), each
    {"runs": [{"metadata": file, "out": folder, "shards": [first, stop]}], "per_host_connections": n}:
    file names and shard numbers, never rows; none when every shard is finished. `instances`: how
    many units may download at once.
    """
    if source_kind == "shards":
        return {"source": source, "units": []}
    if source_kind != "metadata":
        raise ValueError(f"unknown source kind {source_kind!r}")
    from recap_tasks.config import RecapConfig
    from recap_tasks.shards import chunk
    from recap_tasks.stages.download import pending
    from recap_tasks.stages.download import plan as plan_shards

    folders = download_folders(source, lake)
    if dry_run:
        log.info("would download %s", dict(folders))
        return {"source": "", "units": []}
    config = RecapConfig.load().download
    jobs, total = [], 0
    for f, out in folders:
        planned = plan_shards([f], out, config)
        total += len(planned)
        jobs += pending(out, planned)
    units = chunk(jobs, max_chunks=max_units)
    connections = instance_connections(config, min(instances, len(units)))
    log.info("download: %d shards of %d metadata files, %d finished before, %d to do in %d units, "
             "at most %d connections per host each", total, len(folders), total - len(jobs), len(jobs), len(units),
             connections)
    return {"source": ",".join(out for _, out in folders),
            "units": [{"runs": _runs(unit), "per_host_connections": connections} for unit in units]}


def _runs(jobs: list) -> list[dict]:
    """Consecutive shard jobs of one metadata file as one run {"metadata", "out", "shards": [first, stop]}."""
    runs: list[dict] = []
    for job in jobs:
        last = runs[-1] if runs else None
        if last and last["metadata"] == job.path and last["out"] == job.out and last["shards"][1] == job.number:
            last["shards"][1] += 1
        else:
            runs.append({"metadata": job.path, "out": job.out, "shards": [job.number, job.number + 1]})
    return runs


@fail_fast
def download_unit(*, runs: list[dict], per_host_connections: int) -> list[dict]:
    """Download one unit's shards in this process, one at a time, skipping those finished since the
    plan (one listing per folder); its summary per folder."""
    from dataclasses import replace

    from recap_tasks.config import RecapConfig
    from recap_tasks.stages.download import plan as plan_shards
    from recap_tasks.stages.download import run_jobs

    config = replace(RecapConfig.load().download, per_host_connections=per_host_connections, processes=1)
    numbers: dict[tuple[str, str], list[int]] = {}
    for run in runs:
        numbers.setdefault((run["metadata"], run["out"]), []).extend(range(*run["shards"]))
    summaries = []
    for (metadata, out), wanted in numbers.items():
        # plan() is the one definition of a folder's shard jobs (and refuses a changed metadata file).
        jobs = plan_shards([metadata], out, config)
        summaries.append(run_jobs(out, [jobs[n] for n in wanted], config).summary())
    return summaries


def gather_downloads(summaries: list[list[dict]]) -> list[dict]:
    """The download's summary per folder (shards, skipped, rows, successes, failures per reason),
    summed over the task instances' summaries and logged, one line per folder."""
    counts = ("shards", "shards_skipped", "count", "successes", "failed")
    merged: dict[str, dict] = {}
    for summary in (s for unit in summaries for s in unit):
        total = merged.setdefault(summary["out"], {"out": summary["out"], **dict.fromkeys(counts, 0), "reasons": {}})
        for key in counts:
            total[key] += summary[key]
        for reason, n in summary["reasons"].items():
            total["reasons"][reason] = total["reasons"].get(reason, 0) + n
    for total in merged.values():
        total["reasons"] = dict(sorted(total["reasons"].items()))
        log.info("download %s: %s", total["out"], total)
    return list(merged.values())


@fail_fast
def ingest(*, shards: list[str], lake: str, run_id: str) -> dict:
    """Ingest one work unit of shards; returns their shard ids for the next stages."""
    from recap_tasks.stages.ingest import ingest as ingest_sources
    from recap_tasks.lake import Lake

    result = ingest_sources(shards, Lake(lake), run_id=run_id)
    return {**result.summary(), "shard_ids": [s.shard_id for s in result.shards]}


@fail_fast
def filter_pairs(*, lake: str, run_id: str, shard_ids: list[str] | None = None,
                 profile: str = CONFIG_PROFILE) -> dict:
    """Filter the pairs of `shard_ids` with a filter chain profile.

    Row filters run on the Dask cluster at RECAP_DASK_ADDRESS (unless RECAP_CONFIG names
    `filter: {dask_address: ...}`; `./dev standalone` starts one beside `airflow standalone` and
    sets it), or on a LocalCluster of the task's own when unset
    (`filter: {executor: local}` in RECAP_CONFIG runs them in the task's process). Other
    settings: RECAP_CONFIG.
    """
    from recap_tasks.stages.filter import run_filter
    from recap_tasks.lake import Lake

    if profile not in (CONFIG_PROFILE, *FILTER_PROFILES):
        raise ValueError(f"unknown filter profile {profile!r}; known: {[CONFIG_PROFILE, *FILTER_PROFILES]}")
    # The filter section of RECAP_CONFIG and the form's chain if it set one; the stage itself joins
    # this deployment's Dask (recap_tasks.distributed.dask_address).
    config = effective_config(profile=profile).filter
    result = run_filter(Lake(lake), config=config, run_id=run_id, shard_ids=shard_ids)
    return {**result.summary(), "shard_ids": shard_ids or []}


@fail_fast
def validate(*, lake: str, run_id: str) -> dict:
    from recap_tasks.lake import Lake
    from recap_tasks.stages.validate import run_validate

    result = run_validate(Lake(lake), run_id=run_id)
    if result.batch is None:
        log.info("recap: %s", result.note)
    return result.summary()


@fail_fast
def publish(*, lake: str, run_id: str) -> dict:
    from recap_tasks.lake import Lake
    from recap_tasks.stages.publish import run_publish

    return run_publish(Lake(lake), batch_id=run_id, run_id=run_id).summary()


@fail_fast
def report(*, lake: str, run_id: str | None, validated: dict | None = None) -> dict:
    """Build the HTML quality report of a run (or the lake index when run_id is None).

    `validated`: the run's validate summary; when it holds no batch (nothing new was validated)
    there is nothing to report on: say so, write nothing."""
    from recap_tasks.lake import Lake
    from recap_tasks.stages.report import build_report

    if validated is not None and validated.get("batch_id") is None:
        note = f"nothing new in run {run_id}: {validated.get('note') or 'no batch validated'}; no report written"
        log.info("recap: %s", note)
        return {"report": None, "lake": lake, "run_id": run_id, "nothing_new": True, "note": note}
    path = build_report(Lake(lake), run_id=run_id)
    return {"report": str(path), "lake": lake, "run_id": run_id}
