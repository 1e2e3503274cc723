"""Table maintenance and time travel: compact, vacuum (with a retention guard), history, snapshots."""

from __future__ import annotations

import logging

import pyarrow as pa

from recap_tasks import schemas
from recap_tasks.errors import RecapError
from recap_tasks.lake import DEDUP_INDEX, Lake

log = logging.getLogger(__name__)

# Vacuum deletes files no longer referenced by the latest version. A reader still on an older
# version, or anyone time-travelling to one, needs them: Delta's own default keeps 7 days.
MIN_RETENTION_HOURS = 168


def maintain(lake: Lake, *, tables: list[str] | None = None, retention_hours: int = MIN_RETENTION_HOURS,
             dry_run: bool = False, allow_short_retention: bool = False) -> dict:
    """Compact small files, checkpoint, and vacuum files older than `retention_hours`, per table."""
    if retention_hours < MIN_RETENTION_HOURS and not allow_short_retention:
        raise RecapError(
            f"vacuum retention of {retention_hours} h is below {MIN_RETENTION_HOURS} h: readers on older versions "
            f"and time travel would break. Pass --allow-short-retention if no reader can be on an older version.")
    names = tables or [t for t in schemas.TABLES if lake.exists(t)]
    unknown = set(names) - set(schemas.TABLES)
    if unknown:
        raise RecapError(f"unknown tables {sorted(unknown)}; known: {sorted(schemas.TABLES)}")
    out = {}
    for name in names:
        if not lake.exists(name):
            continue
        dt = lake.delta(name)
        lake.check_layout(name, dt)
        before = len(dt.file_uris())
        if dry_run:
            compacted = {}
        elif name == DEDUP_INDEX:
            # Sorted by key: files and row groups then cover narrow key ranges, and lookups read
            # only the row groups their keys fall in.
            from deltalake import WriterProperties

            from recap_tasks.filters.dedup_index import ROW_GROUP

            compacted = dt.optimize.z_order(["key"], writer_properties=WriterProperties(max_row_group_size=ROW_GROUP))
        else:
            compacted = dt.optimize.compact()
        if not dry_run:
            dt.create_checkpoint()
        removed = dt.vacuum(retention_hours=retention_hours, dry_run=dry_run,
                            enforce_retention_duration=not allow_short_retention)
        out[name] = {"files_before": before, "files_after": len(lake.delta(name).file_uris()),
                     "compacted": {k: compacted.get(k) for k in ("numFilesAdded", "numFilesRemoved")},
                     "vacuumed" if not dry_run else "would_vacuum": len(removed),
                     "version": lake.version(name)}
        log.info("maintain %s: %s", name, out[name])
    return out


def history(lake: Lake, table: str = "recap", limit: int | None = 20) -> list[dict]:
    """Versions of a table, newest first: operation, time, rows written, and our batch id."""
    if not lake.exists(table):
        raise RecapError(f"no table {table!r} in {lake.uri}")
    out = []
    for entry in lake.delta(table).history(limit):
        metrics = entry.get("operationMetrics") or {}
        out.append({"version": entry.get("version"), "timestamp": entry.get("timestamp"),
                    "operation": entry.get("operation"),
                    "batch_id": entry.get("recap.batch_id"),
                    "rows_inserted": metrics.get("num_target_rows_inserted", metrics.get("num_added_rows")),
                    "rows_updated": metrics.get("num_target_rows_updated")})
    return out


def snapshot(lake: Lake, table: str = "recap", *, version: int | None = None, as_of: str | None = None) -> pa.Table:
    """The table as it was at `version` or at the ISO timestamp `as_of` (time travel)."""
    if not lake.exists(table):
        raise RecapError(f"no table {table!r} in {lake.uri}")
    target = version if version is not None else as_of
    try:
        dt = lake.delta(table, version=target)
    except Exception as exc:  # delta-rs raises on versions that never existed or were cleaned up
        raise RecapError(f"cannot load {table!r} at {target!r}: {exc}") from exc
    return dt.to_pyarrow_dataset().to_table(use_threads=False)


def migrate(lake: Lake, *, run_id: str = "migrate") -> dict:
    """Rewrite a lake made before shard partitions: tables partitioned by shard, per-shard progress
    records (from the old ingest ledger and the tables), the dedup index, and batch shard lists.

    Reads every table once (the one O(lake) step, done once); safe to rerun: a table already in
    the new layout is left as it is, records and index entries are recomputed idempotently.
    """
    from recap_tasks import progress
    from recap_tasks.batches import all_batches, read_uids
    from recap_tasks.filters import dedup_index
    from recap_tasks.lake import _conform, _normalize

    if not lake.exists():
        raise RecapError(f"no lake at {lake.uri}")
    out: dict = {"tables": {}}
    for name in schemas.SHARD_TABLES:
        if not lake.exists(name):
            continue
        dt = lake.delta(name)
        if list(dt.metadata().partition_columns) == list(schemas.TABLES[name].partition_by):
            out["tables"][name] = "already partitioned"
            continue
        data = dt.to_pyarrow_dataset().to_table(use_threads=False)
        data = _conform(_normalize(data), schemas.TABLES[name])
        lake.write_delta(name, data, mode="overwrite", schema_mode="overwrite",
                         partition_by=list(schemas.TABLES[name].partition_by))
        out["tables"][name] = f"{data.num_rows} rows repartitioned by shard"
        log.info("migrate %s: %s", name, out["tables"][name])
    # Progress records: the old ingest ledger holds what ingest knew of each source file.
    sources = {}
    for rel in lake.list("_ledger/ingest", ".json"):
        entry = lake.read_json(rel) or {}
        if entry.get("shard_id"):
            sources[entry["shard_id"]] = {k: entry.get(k) for k in ("source_uri", "size", "mtime_ns", "truncated",
                                                                    "detail")}
    pairs = lake.read("pairs", ["uid", "shard_id", "sha256"])
    rejected = lake.read("rejected", ["shard_id"])
    shard_ids = sorted(set(sources) | set(pairs.column("shard_id").to_pylist())
                       | set(rejected.column("shard_id").to_pylist()))
    stages = [s for s in progress.STAGES if s != "download"]  # lakes this old never read download records
    for stage in stages:
        progress.record(lake, stage, shard_ids, run_id=run_id, sources=sources if stage == "ingest" else None)
    out["progress_records"] = len(shard_ids) * len(stages)
    # The dedup index, from the rows the filter kept: built when absent, rebuilt when it was written
    # by an older Recap or for another pHash radius.
    from recap_tasks.config import RecapConfig

    max_distance = RecapConfig.load().filter.max_phash_distance
    try:
        dedup_index.check_kinds(lake, max_distance)
        stale = False
    except RecapError:
        stale = True
    if (stale or not lake.exists(DEDUP_INDEX)) and lake.exists("filter_results"):
        out["dedup_index_entries"] = dedup_index.add_kept(
            lake, lake.read("filter_results", ["uid", "kept", "phash"]),
            dict(zip(pairs.column("uid").to_pylist(), pairs.column("sha256").to_pylist())),
            max_distance, replace=True)
    # Batches now name their shards (reports and publish read only those).
    shard_of = dict(zip(pairs.column("uid").to_pylist(), pairs.column("shard_id").to_pylist()))
    for batch in all_batches(lake):
        if not batch.shards:
            try:
                uids = read_uids(lake, batch).to_pylist()
            except FileNotFoundError:
                continue
            batch.shards = sorted({shard_of[u] for u in uids if u in shard_of})
            batch.save(lake)
    log.info("migrate %s: %s", lake.uri, out)
    return out
