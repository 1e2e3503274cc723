"""Table maintenance and time travel: compact, vacuum (with a retention guard), history, snapshots."""

from __future__ import annotations

import logging

import pyarrow as pa

from recap_tasks import schemas
from recap_tasks.errors import RecapError
from recap_tasks.lake import Lake

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
        before = len(dt.file_uris())
        compacted = {} if dry_run else dt.optimize.compact()
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
