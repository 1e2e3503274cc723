"""Table maintenance and time travel: compact, vacuum (with a retention guard), history, snapshots."""

from __future__ import annotations

import contextlib
import datetime as dt_
import functools
import logging
import time
from collections import Counter
from typing import Callable, Iterator

import pyarrow as pa

from recap_tasks import schemas
from recap_tasks.errors import RecapError
from recap_tasks.lake import DEDUP_INDEX, SHARD_WRITER, Lake, bucket_digits

log = logging.getLogger(__name__)

# Vacuum deletes files no longer referenced by the latest version. A reader still on an older
# version, or anyone time-travelling to one, needs them: Delta's own default keeps 7 days.
MIN_RETENTION_HOURS = 168
# A maintain holds each table it works on through an app transaction (`holding`): delta-rs 1.6 lets two
# compactions of the same files both commit (their rows then twice), so two maintains must never
# compact one table at once. A hold older than this is taken to be a maintain that died.
LEASE_APP_ID = "recap-maintain"
LEASE_HOURS = 24


def maintain(lake: Lake, *, tables: list[str] | None = None, retention_hours: int = MIN_RETENTION_HOURS,
             dry_run: bool = False, allow_short_retention: bool = False, take_over: bool = False) -> dict:
    """Compact small files, checkpoint, and vacuum files older than `retention_hours`, per table."""
    if retention_hours < 0:
        raise RecapError(f"--retention-hours must be 0 or more, got {retention_hours}")
    if retention_hours < MIN_RETENTION_HOURS and not allow_short_retention:
        raise RecapError(
            f"vacuum retention of {retention_hours} h is below {MIN_RETENTION_HOURS} h: readers on older versions "
            f"and time travel would break. Pass --allow-short-retention if no reader can be on an older version.")
    names = tables or [t for t in schemas.TABLES if lake.exists(t)]
    if not names:
        raise RecapError(f"no lake at {lake.uri}: it holds none of the lake's Delta tables "
                         f"({', '.join(sorted(schemas.TABLES))})")
    unknown = set(names) - set(schemas.TABLES)
    if unknown:
        raise RecapError(f"unknown tables {sorted(unknown)}; known: {sorted(schemas.TABLES)}")
    out = {}
    for name in names:
        if not lake.exists(name):
            continue
        with contextlib.nullcontext() if dry_run else holding(lake, name, take_over=take_over):
            out[name] = _maintain_table(lake, name, retention_hours=retention_hours, dry_run=dry_run,
                                        allow_short_retention=allow_short_retention)
        log.info("maintain %s: %s", name, out[name])
    return out


@contextlib.contextmanager
def holding(lake: Lake, table: str, *, take_over: bool = False) -> Iterator[None]:
    """Hold `table` for one maintain: an empty commit carrying the app transaction LEASE_APP_ID
    with an odd version (2 x the time in ms + 1), released by an even one. A second maintain finds
    it held and stops with one line; two that claim at once both commit that app id, and delta-rs
    fails the second (a concurrent transaction on the same app id). Stage writers never carry it,
    so a hold does not conflict with them."""
    from deltalake import CommitProperties, Transaction, write_deltalake
    from deltalake.exceptions import CommitFailedError

    from recap_tasks.lake import conform

    def mark(dt, version: int) -> None:
        empty = conform(schemas.TABLES[table].empty_table(), schemas.TABLES[table])
        write_deltalake(dt, empty, mode="append", schema_mode="merge", commit_properties=CommitProperties(
            app_transactions=[Transaction(app_id=LEASE_APP_ID, version=version)],
            custom_metadata={"recap.operation": "maintain-hold" if version % 2 else "maintain-release"}))

    dt = lake.delta(table)
    held = dt.transaction_version(LEASE_APP_ID) or 0
    since_ms = held // 2
    if held % 2 and time.time() * 1000 - since_ms < LEASE_HOURS * 3600e3 and not take_over:
        since = dt_.datetime.fromtimestamp(since_ms / 1000, dt_.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise RecapError(f"table {lake.path(table)}: another `recap maintain` has held it since {since} (two at once "
                         f"would commit the same compaction twice); wait for it to end, or, if it died, rerun with "
                         f"--take-over (a hold older than {LEASE_HOURS} h is taken over by itself)")
    now_ms = int(time.time() * 1000)
    try:
        mark(dt, 2 * now_ms + 1)
    except CommitFailedError as exc:
        raise RecapError(f"table {lake.path(table)}: another `recap maintain` claimed it at the same moment ({exc}); "
                         f"wait for it to end") from exc
    try:
        yield
    finally:
        mark(lake.delta(table), 2 * max(now_ms, int(time.time() * 1000)))


def _maintain_table(lake: Lake, name: str, *, retention_hours: int, dry_run: bool,
                    allow_short_retention: bool) -> dict:
    """One table's maintain (see `maintain`)."""
    dt = lake.delta(name)
    lake.check_layout(name, dt)
    before = len(dt.file_uris())
    if not dry_run:
        # A table created by an older Recap: statistics for the pruning columns only (files
        # written from now on; this maintain's rewrite included) and its checkpoint interval.
        lake.set_properties(name)
    compacted = {} if dry_run else _compact(lake, name)
    dt = lake.delta(name)
    if not dry_run:
        dt.create_checkpoint()
    removed = dt.vacuum(retention_hours=retention_hours, dry_run=dry_run,
                        enforce_retention_duration=not allow_short_retention)
    out = {"files_before": before, "files_after": len(lake.delta(name).file_uris()),
           "compacted": {k: compacted.get(k) for k in ("numFilesAdded", "numFilesRemoved")},
           "vacuumed" if not dry_run else "would_vacuum": len(removed),
           "version": lake.version(name)}
    if name == DEDUP_INDEX and not dry_run:
        # Point-lookup runs for the re-sorted files; the runs of files that left are deleted.
        from recap_tasks.filters.dedup_index import build_runs

        out.update(build_runs(lake))
    return out


COMPACT_TRIES = 3


def _compact(lake: Lake, name: str) -> dict:
    """Compact one table, retried when a stage's write (a fold, a publish) changed the files the
    compaction read: delta-rs then fails the commit and nothing of it is committed."""
    from deltalake import WriterProperties
    from deltalake.exceptions import CommitFailedError

    for attempt in range(COMPACT_TRIES):
        dt = lake.delta(name)
        try:
            if name in schemas.SHARD_TABLES:
                return cluster_buckets(dt)
            if name == DEDUP_INDEX:
                # Sorted by key: files and row groups then cover narrow key ranges, and lookups read
                # only the row groups their keys fall in.
                from recap_tasks.filters.dedup_index import ROW_GROUP

                return dt.optimize.z_order(["key"], writer_properties=WriterProperties(max_row_group_size=ROW_GROUP))
            return dt.optimize.compact()
        except CommitFailedError as exc:
            if attempt == COMPACT_TRIES - 1:
                raise RecapError(f"table {lake.path(name)}: {COMPACT_TRIES} compactions in a row lost to concurrent "
                                 f"writes ({exc}); nothing of them was committed: rerun `recap maintain` when the "
                                 f"lake is quieter") from exc
            log.info("compaction of %s lost to a concurrent write, again: %s", name, exc)
    raise AssertionError("unreachable")


def cluster_buckets(dt) -> dict:
    """Compact each bucket that gained files since the last run into files sorted by shard_key
    (z-order on the one column), with row groups small enough that a read of one shard skips the
    rest. Buckets with a single file are already in that shape (writers sort what they append) and
    are not rewritten: a maintain run costs the buckets that changed, not the table."""
    actions = pa.table(dt.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return {}
    files = Counter(actions.column(f"partition.{schemas.SHARD_BUCKET}").to_pylist())
    changed = sorted(b for b, n in files.items() if n > 1)
    if not changed:
        return {}
    return dt.optimize.z_order([schemas.SHARD_KEY], partition_filters=[(schemas.SHARD_BUCKET, "in", changed)],
                               writer_properties=SHARD_WRITER)


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
        return lake.read_version(table, target)
    except Exception as exc:  # delta-rs raises on versions that never existed or were cleaned up
        raise RecapError(f"cannot load {table!r} at {target!r}: {exc}") from exc


def migrate(lake: Lake, *, run_id: str = "migrate") -> dict:
    """Rewrite a lake made by an older Recap: row tables into shard buckets (from no partitions, or
    one partition per shard), per-shard progress records (from the old ingest ledger and the
    tables), the dedup index, and batch shard lists. Run it with no stage writing to the lake.

    Reads every table once (the one O(lake) step, done once), a bucket at a time; safe to rerun: a
    table already in the new layout is left as it is, records and index entries are recomputed
    idempotently.
    """
    from recap_tasks import progress

    if not lake.exists():
        raise RecapError(f"no lake at {lake.uri}")
    out: dict = {"tables": _migrate_tables(lake)}
    # Read once, only if a step below needs it.
    pairs = functools.cache(lambda: lake.read("pairs", ["uid", "shard_id", "sha256"]))
    # Progress records (lakes before them had none). A lake that has them keeps them as they are.
    if not lake.exists(progress.PROGRESS):
        out["progress_records"] = _migrate_progress(lake, pairs(), run_id)
    out.update(_migrate_dedup_index(lake, pairs))
    _name_batch_shards(lake, pairs)
    log.info("migrate %s: %s", lake.uri, out)
    return out


def _migrate_tables(lake: Lake) -> dict[str, str]:
    """Each shard table not yet in the bucket layout rewritten into it; table -> what was done."""
    done = {}
    for name in schemas.SHARD_TABLES:
        if not lake.exists(name):
            continue
        dt = lake.delta(name)
        have = list(dt.metadata().partition_columns)
        digits = bucket_digits(dt)
        if have == list(schemas.TABLES[name].partition_by) and digits in (None, schemas.BUCKET_DIGITS):
            done[name] = "already in the bucket layout"
            continue
        rows = _rewrite_bucketed(lake, name, dt)
        was = f"{16 ** digits} shard buckets" if have == [schemas.SHARD_BUCKET] else have or "no partitions"
        done[name] = f"{rows} rows rewritten from {was} into shard buckets ({16 ** schemas.BUCKET_DIGITS})"
        log.info("migrate %s: %s", name, done[name])
    return done


def _migrate_progress(lake: Lake, pairs: pa.Table, run_id: str) -> int:
    """Record every stage after download for every shard of the lake; the records written. The old
    ingest ledger holds what ingest knew of each source file."""
    from recap_tasks import progress

    sources = {}
    for rel in lake.list("_ledger/ingest", ".json"):
        entry = lake.read_json(rel) or {}
        if entry.get("shard_id"):
            sources[entry["shard_id"]] = {k: entry.get(k) for k in ("source_uri", "size", "mtime_ns", "truncated",
                                                                    "detail")}
    rejected = lake.read("rejected", ["shard_id"])
    shard_ids = sorted(set(sources) | set(pairs.column("shard_id").to_pylist())
                       | set(rejected.column("shard_id").to_pylist()))
    stages = [s for s in progress.STAGES if s != "download"]  # lakes this old never read download records
    for stage in stages:
        progress.record(lake, stage, shard_ids, run_id=run_id, sources=sources if stage == "ingest" else None)
    return len(shard_ids) * len(stages)


def _migrate_dedup_index(lake: Lake, pairs: Callable[[], pa.Table]) -> dict:
    """The dedup index, from the rows the filter kept: built when absent, rebuilt when it was written
    by an older Recap or for another pHash radius. What was built ({} when nothing was)."""
    from recap_tasks.config import RecapConfig
    from recap_tasks.filters import dedup_index

    max_distance = RecapConfig.load().filter.max_phash_distance
    try:
        dedup_index.check_kinds(lake, max_distance)
        stale = False
    except RecapError:
        stale = True
    wanted = stale or not lake.exists(DEDUP_INDEX)
    if not wanted or not lake.exists("filter_results"):
        return {}
    built = {"dedup_index_entries": dedup_index.add_kept(
        lake, lake.read("filter_results", ["uid", "kept", "phash"]),
        dict(zip(pairs().column("uid").to_pylist(), pairs().column("sha256").to_pylist())),
        max_distance, replace=True)}
    built.update(dedup_index.build_runs(lake))  # written sorted: runs right away
    return built


def _name_batch_shards(lake: Lake, pairs: Callable[[], pa.Table]) -> None:
    """Batches now name their shards (reports and publish read only those): name them where they do not."""
    from recap_tasks.batches import all_batches, read_uids

    unnamed = [b for b in all_batches(lake) if not b.shards]
    if not unnamed:
        return
    shard_of = dict(zip(pairs().column("uid").to_pylist(), pairs().column("shard_id").to_pylist()))
    for batch in unnamed:
        try:
            uids = read_uids(lake, batch).to_pylist()
        except FileNotFoundError:
            continue
        batch.shards = sorted({shard_of[u] for u in uids if u in shard_of})
        batch.save(lake)


def _rewrite_bucketed(lake: Lake, name: str, dt) -> int:
    """Rewrite table `name` (snapshot `dt`, another layout) partitioned by shard bucket, each bucket
    sorted by shard_key; returns its rows. Streams one old bucket's rows at a time (`Lake.rewrite`:
    a local table is written fresh and the old one kept in `_migrated/`)."""
    from recap_tasks.batches import all_batches
    from recap_tasks.stages.publish import APP_ID_PREFIX

    schema = schemas.TABLES[name]
    old = list(dt.metadata().partition_columns)
    actions = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
    groups: dict[str, list[str]] = {}
    for action in actions:  # the old files partition by partition (shards by bucket); unpartitioned: one group
        if old == [schemas.SHARD_KEY]:
            group = schemas.bucket_of(action.get(f"partition.{schemas.SHARD_KEY}") or "")
        elif old == [schemas.SHARD_BUCKET]:  # another bucket count: one old bucket at a time in memory
            group = action.get(f"partition.{schemas.SHARD_BUCKET}") or ""
        else:
            group = ""
        groups.setdefault(group, []).append(action["path"])

    def buckets():
        # Shard key and bucket are recomputed from shard_id as each old file is read (`Lake.read_file`).
        for _, paths in sorted(groups.items()):
            parts = [lake.read_file(name, path) for path in paths]
            yield pa.concat_tables(parts) if parts else schema.empty_table()

    # publish's exactly-once marks must survive the rewrite
    keep = [APP_ID_PREFIX + batch.batch_id for batch in all_batches(lake)] if name == "recap" else []
    return lake.rewrite(name, buckets(), keep_app_ids=keep, metadata={"recap.operation": "migrate"})
