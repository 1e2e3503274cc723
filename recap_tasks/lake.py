"""The lake: named Delta tables under one root, plus run metadata beside them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from recap_tasks import faults, schemas, storage
from recap_tasks.errors import RecapError
from recap_tasks.ids import shard_key
from recap_tasks.storage import s3_filesystem

log = logging.getLogger(__name__)

# Table names are fixed: every stage, `recap status` and the reports find each other's outputs here.
PAIRS = "pairs"
REJECTED = "rejected"
FILTER_RESULTS = "filter_results"
CAPTIONS = "captions"
RECAP = "recap"
QUARANTINE = "quarantine"

PROGRESS = "progress"
DEDUP_INDEX = "dedup_index"

_COMMIT_RETRIES = 12
# A bucket's files under SMALL_FILE_BYTES are folded into one once it holds FOLD_AT of them
# (`Lake.fold_small_files`): a table keeps fewer than FOLD_AT small files per bucket between maintains.
SMALL_FILE_BYTES = 32 * 2**20
FOLD_AT = 4
# The progress table gets a record file per shard and stage (~3.7 KB each): its files under
# RECORD_FILE_BYTES (~8,000 records) are compacted per stage partition once it holds FOLD_AT of them
# (`Lake.fold_records`), so it keeps fewer than FOLD_AT small files per stage plus full ones. Small
# on purpose: each fold rewrites at most this much.
RECORD_FILE_BYTES = 256 * 2**10


# Rows per row group in a shard-table file (written sorted by shard_key): about one DataComp shard
# (10k rows), so a read of one shard skips the row groups of the others by their statistics, in a
# fold's or a commit's file as in a compacted one (`recap maintain`).
SHARD_ROW_GROUP = 16_384
SHARD_WRITER = WriterProperties(max_row_group_size=SHARD_ROW_GROUP)


class CommitConflict(RecapError):
    """A commit that kept losing to concurrent writers; nothing of it was committed."""


class Lake:
    """A lake root, a local folder or an S3 URI, holding Delta tables and small run records.

    Everything but the Delta tables (batch records, run summaries and configs, reports) is addressed
    by a path relative to the root, e.g. `lake.write_json("_runs/r1/summary.json", {...})`.
    S3 credentials, region and endpoint come from the standard AWS_* environment variables (never
    from code or config files); `AWS_ENDPOINT_URL` points at an S3-compatible store.
    """

    def __init__(self, root: str | os.PathLike[str]):
        root = os.fspath(root)
        scheme = root.split("://", 1)[0].lower() if "://" in root else "file"
        self.storage_options: dict[str, str] = {}
        if scheme in ("s3", "s3a"):
            bucket_and_prefix = root.split("://", 1)[1].strip("/")
            if not bucket_and_prefix:
                raise RecapError(f"lake {root!r}: name a bucket, e.g. s3://bucket/lake")
            self.uri = f"s3://{bucket_and_prefix}"
            self.fs, self._fs_root = s3_filesystem(), bucket_and_prefix
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
            if endpoint.startswith("http://"):
                self.storage_options["AWS_ALLOW_HTTP"] = "true"
            self.is_local = False
        elif scheme == "file":
            local = Path(root.removeprefix("file://")).expanduser().resolve()
            self.uri = self._fs_root = str(local)
            self.fs = pafs.LocalFileSystem()
            self.is_local = True
        else:
            raise RecapError(f"lake {root!r}: supported lakes are local folders and s3:// URIs")
        self._known: set[str] = set()  # tables known to exist
        self._open: dict[str, DeltaTable] = {}  # latest-version tables, refreshed on each use
        self._checked: set[str] = set()  # tables whose partition layout was checked

    def __repr__(self) -> str:
        return f"Lake({self.uri!r})"

    @property
    def root(self) -> Path:
        """The lake's folder (local lakes only)."""
        if not self.is_local:
            raise RecapError(f"lake {self.uri} is in object storage; it has no local folder")
        return Path(self.uri)

    def path(self, table: str) -> str:
        """The URI of a Delta table in this lake (only the lake's own tables)."""
        if table not in schemas.TABLES:
            raise RecapError(f"no table {table!r} in a lake; known: {', '.join(sorted(schemas.TABLES))}")
        return f"{self.uri}/{table}"

    def delta(self, table: str, version: int | str | None = None) -> DeltaTable:
        """The Delta table `table` at its latest version (or an earlier one: time travel).

        The latest-version object is kept per lake and brought up to date from the commits since
        (`update_incremental`), so repeated opens do not re-read the table's whole file list.
        """
        if version is not None:
            dt = DeltaTable(self.path(table), storage_options=self.storage_options or None)
            dt.load_as_version(version)
            return dt
        dt = self._open.get(table)
        if dt is None:
            dt = self._open[table] = DeltaTable(self.path(table), storage_options=self.storage_options or None)
        else:
            dt.update_incremental()
        return dt

    def forget(self, table: str) -> None:
        """Drop what this object cached of `table` (after it was rewritten by another path)."""
        self._open.pop(table, None)
        self._checked.discard(table)
        self._known.discard(table)

    def write_delta(self, table: str, data: pa.Table, **kwargs) -> None:
        write_deltalake(self.path(table), data, storage_options=self.storage_options or None, **kwargs)

    def exists(self, table: str | None = None) -> bool:
        """Whether the lake (or one of its Delta tables) exists.

        A table exists once its first version is committed: a table another writer is creating
        (its log folder there, no commit in it yet) does not, and reads as empty.
        """
        if table is None:
            return self.fs.get_file_info(self._fs_root).type == pafs.FileType.Directory
        if table in self._open:
            return True
        if self.fs.get_file_info(f"{self._fs_root}/{table}/_delta_log").type != pafs.FileType.Directory:
            return False
        try:
            self.delta(table)
        except TableNotFoundError:
            return False
        return True

    @contextlib.contextmanager
    def staged_dir(self, rel: str) -> Iterator[Path]:
        """A local folder for tools that write plain files (GX Data Docs); uploaded on exit for S3."""
        if self.is_local:
            d = self.root / rel
            d.mkdir(parents=True, exist_ok=True)
            yield d
            return
        with tempfile.TemporaryDirectory(prefix="recap-stage-") as tmp:
            yield Path(tmp)
            for f in Path(tmp).rglob("*"):
                if f.is_file():
                    self.write_bytes(f"{rel}/{f.relative_to(tmp).as_posix()}", f.read_bytes())

    # Tables --------------------------------------------------------------------------------

    def ensure(self, table: str) -> None:
        """Create `table` empty, with its schema and partitioning, if it does not exist yet.

        The create is exclusive: it commits version 0 with no retry, and the store's put-if-absent
        of that first commit (a local rename without replace; a conditional PUT on S3) lets one
        creator win. A loser adopts the winner's table. (With delta-rs's default retries a losing
        create commits again as version 1 with a metadata action of its own, and every writer that
        read version 0 then fails with "Metadata changed since last commit".) Tables are created
        empty and then only appended to or overwritten by predicate, inside `commit`'s retries.
        """
        if table in self._known or self.exists(table):
            self._known.add(table)
            return
        schema = schemas.TABLES[table]
        try:
            DeltaTable.create(self.path(table), schema.arrow, mode="ignore",
                              partition_by=list(schema.partition_by) or None, configuration=schema.properties,
                              storage_options=self.storage_options or None,
                              commit_properties=CommitProperties(max_commit_retries=0))
        except CommitFailedError as exc:  # another writer committed version 0 first
            if not self.exists(table):
                raise
            log.debug("table %s was created concurrently (%s)", table, exc)
        self._known.add(table)

    def check_layout(self, table: str, dt: DeltaTable | None = None) -> None:
        """A table written by an older Recap (another partitioning, another bucket count) must be
        migrated first."""
        if table in self._checked:
            return
        dt = dt or self.delta(table)
        want = list(schemas.TABLES[table].partition_by)
        have = list(dt.metadata().partition_columns)
        migrate = f"migrate the lake once with `recap maintain --migrate --lake {self.uri}`"
        if have != want:
            raise RecapError(f"table {self.path(table)} is partitioned by {have or 'nothing'}, this Recap expects "
                             f"{want}: {migrate}")
        if (digits := bucket_digits(dt)) not in (None, schemas.BUCKET_DIGITS):
            raise RecapError(f"table {self.path(table)} has {16 ** digits} shard buckets, this Recap writes "
                             f"{16 ** schemas.BUCKET_DIGITS}: {migrate}")
        self._checked.add(table)

    # Reading -----------------------------------------------------------------------------

    def read(self, table: str, columns: list[str] | None = None, *, shards: Iterable[str] | None = None,
             where: pc.Expression | None = None, partitions: list[tuple] | None = None) -> pa.Table:
        """Read a table (or the named columns); an absent table reads as empty.

        With `shards` (shard ids), only those shards' files are opened: their buckets' partitions,
        pruned by the files' shard_key statistics, then row groups by theirs. The cost follows the
        shards asked for, not the size of the table.

        Without `shards`: `partitions` (delta-rs `(column, op, values)` filters on partition
        columns and file statistics) skips whole files, `where` (a pyarrow expression) filters rows
        as they are scanned.
        """
        if shards is not None and (where is not None or partitions):
            raise ValueError("read: `where` and `partitions` apply to a read without `shards`")
        schema = schemas.TABLES[table]
        wanted = columns or schema.arrow.names
        keys = None if shards is None else sorted({shard_key(s) for s in shards})
        if not self.exists(table) or keys == []:
            return schema.empty_table().select(wanted)
        dt = self.delta(table)
        if keys is not None:
            self.check_layout(table, dt)
            data = self.read_shards(table, dt, keys, columns=wanted)
        else:
            present = set(dt.schema().to_arrow().names)
            # use_threads=False: a threaded scan makes the process abort at exit (delta-rs #2184).
            dataset = dt.to_pyarrow_dataset(file_pruning_predicate=partitions)
            data = normalize(dataset.to_table(columns=[c for c in wanted if c in present], filter=where,
                                              use_threads=False))
        # Columns added to the schema after the table was written read as nulls.
        for name in wanted:
            if name not in data.column_names:
                data = data.append_column(schema.arrow.field(name), pa.nulls(data.num_rows, schema.arrow.field(name).type))
        return data.select(wanted)

    def read_version(self, table: str, version: int | str | None = None) -> pa.Table:
        """The whole table as stored at `version` (a number or an ISO timestamp; default: the latest).

        Columns as that version has them (no conforming): time travel shows the past as it was."""
        # use_threads=False: a threaded scan makes the process abort at exit (delta-rs #2184).
        return self.delta(table, version).to_pyarrow_dataset().to_table(use_threads=False)

    def read_file(self, table: str, path: str) -> pa.Table:
        """One data file of a table (by the path its add action names), conformed to the table's
        schema (a shard table's key and bucket recomputed from shard_id).

        Read with pyarrow, not delta-rs: safe inside a delta-rs write that consumes the result
        (a delta-rs read there would nest its runtime)."""
        with self.open_table_file(table, path) as f:
            return conform(normalize(pq.read_table(f)), schemas.TABLES[table])

    def version(self, table: str) -> int | None:
        """The table's latest version (None when it does not exist)."""
        return self.delta(table).version() if self.exists(table) else None

    def committed(self, table: str, app_id: str) -> bool:
        """Whether the table's latest version records the app transaction `app_id` (a write done
        exactly once under that id, e.g. a published batch)."""
        return self.delta(table).transaction_version(app_id) is not None

    def uids(self, table: str, *, shards: Iterable[str] | None = None) -> pa.Array:
        return self.read(table, ["uid"], shards=shards).column("uid").combine_chunks()

    # Writing -----------------------------------------------------------------------------

    def insert_new(self, table: str, data: pa.Table, keys: Iterable[str] = ("uid",)) -> int:
        """Insert rows whose keys are not in the table yet, on the shards in `data`: read their keys,
        append the new rows (what a MERGE ... WHEN NOT MATCHED INSERT would do, without its cost: a
        delta-rs MERGE plans over every file of the table, an append does not). Each commit
        carries one app transaction per bucket it writes to (at most 16 per table, whatever the
        shard count), so concurrent inserters into one shard conflict (delta-rs fails a commit
        whose app ids a concurrent commit also wrote) and the loser retries against the winner's
        rows. Returns the number of rows inserted.
        """
        if data.num_rows == 0:
            return 0
        data = conform(data, schemas.TABLES[table])  # append_to writes it sorted by shard_key
        self.ensure(table)
        keys = list(keys)
        shards = sorted(set(data.column(schemas.SHARD_KEY).to_pylist()))

        def attempt(dt: DeltaTable) -> int:
            present = self.read_shards(table, dt, shards, columns=keys)
            new = data
            if present.num_rows:
                new = data.filter(not_in(_key_strings(data, keys), _key_strings(present, keys)))
            if new.num_rows == 0:
                return 0
            self.append_to(dt, new, commit_properties=CommitProperties(
                app_transactions=bucket_transactions(dt, insert_prefix(table), shards)))
            return new.num_rows

        inserted = self.commit(table, attempt)
        if inserted:
            self.fold_small_files(table, shards)
        return inserted

    def update_shards(self, table: str, keys: list[str], change, *, bucket_prefix: str,
                      metadata: dict[str, str] | None = None, app_id: str | None = None):
        """Change the rows of the shards `keys` (shard keys) in one commit, serialised against other
        writers of those shards; returns what `change` returns as its result.

        `change(current)` gets the shards' current rows and returns `(kept, added, result)`: with
        `kept` None, `added` is appended; else the shards' rows are replaced by `kept` + `added`.
        Nothing is committed when `kept` is None and `added` is empty. The commit carries one app
        transaction per bucket written (`bucket_prefix` + bucket): delta-rs fails a commit whose
        app ids a concurrent commit also wrote, so the loser retries through `commit`, re-reads the
        shards and decides again. With `app_id` the write is exactly-once: a table that already
        records `app_id` is left alone and None returned.
        """
        def attempt(dt: DeltaTable):
            if app_id is not None and dt.transaction_version(app_id) is not None:
                return None
            kept, added, result = change(self.read_shards(table, dt, keys))
            if kept is None and added.num_rows == 0:
                return result
            txns = bucket_transactions(dt, bucket_prefix, keys)
            if app_id is not None:
                txns = [Transaction(app_id=app_id, version=1), *txns]
            commit = CommitProperties(custom_metadata=metadata, app_transactions=txns)
            if kept is None:
                self.append_to(dt, added, commit_properties=commit)
            else:
                self.replace_shards(dt, keys, pa.concat_tables([kept, added]), commit_properties=commit)
            wrote.append(True)
            return result

        wrote: list[bool] = []
        out = self.commit(table, attempt)
        if wrote:
            self.fold_small_files(table, keys)
        return out

    def fold_small_files(self, table: str, keys: Iterable[str]) -> int:
        """After a write to the buckets of the shard `keys`: each of those buckets holding FOLD_AT
        small files (under SMALL_FILE_BYTES) or more has them rewritten as one file sorted by
        shard_key, in one commit; returns the files folded.

        Every commit adds a file to each bucket it writes, so without this a table's file count, and
        with it the cost of opening the table and of each commit, grows with the commits since the
        last `recap maintain` (16,600 files after 65 commits of 2,000 shards). Folding keeps it at
        fewer than FOLD_AT small files per bucket plus the large ones, whatever the number of
        commits. What is rewritten is what the last few commits wrote to the bucket (a file stops
        being small once it reaches SMALL_FILE_BYTES), so each row is folded a few times at most.

        The fold replaces the rows of the folded files' shards with the same rows (content is
        unchanged), under the bucket app transactions `insert_new` takes: a concurrent writer of
        those buckets conflicts and one of the two retries. Best effort: a fold that keeps losing
        is left to the next write or `recap maintain`.
        """
        if table not in schemas.SHARD_TABLES:
            return 0
        buckets = sorted({schemas.bucket_of(k) for k in keys})

        def attempt(dt: DeltaTable) -> int:
            paths, whole = self.small_files(dt, buckets)
            if not paths:
                return 0
            # A bucket whose files are all small is rewritten whole (a partition predicate: delta-rs
            # drops its files without scanning them); elsewhere the small files' shards are.
            keys: set[str] = set()
            for path, bucket in paths:
                if bucket not in whole:
                    with self.open_table_file(table, path) as f:
                        keys.update(pq.read_table(f, columns=[schemas.SHARD_KEY]).column(0).unique().to_pylist())
            fold_keys = sorted(k for k in keys if k)
            parts, clauses = [], []
            if whole:
                dataset = dt.to_pyarrow_dataset(file_pruning_predicate=[(schemas.SHARD_BUCKET, "in", whole)])
                parts.append(conform(normalize(dataset.to_table(filter=pc.field(schemas.SHARD_BUCKET).isin(whole),
                                                                use_threads=False)), schemas.TABLES[table]))
                clauses.append(f"{schemas.SHARD_BUCKET} IN ({sql_list(whole)})")
            if fold_keys:
                parts.append(self.read_shards(table, dt, fold_keys))
                clauses.append(shards_sql(fold_keys))
            commit = CommitProperties(custom_metadata={"recap.operation": "fold"}, app_transactions=transactions(
                dt, insert_prefix(table), sorted({b for _, b in paths})))
            self.overwrite(dt, pa.concat_tables(parts), " OR ".join(f"({c})" for c in clauses), commit_properties=commit)
            return len(paths)

        try:
            return self.commit(table, attempt, data=False)
        except CommitConflict as exc:
            log.info("fold of %s buckets %s left for later: %s", table, buckets, exc)
            return 0

    @staticmethod
    def small_files(dt: DeltaTable, buckets: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
        """The small files (path, bucket) of those of `buckets` that hold FOLD_AT of them or more,
        and which of those buckets hold no other file."""
        actions = pa.table(dt.get_add_actions(flatten=True)).select(["path", "size_bytes",
                                                                    f"partition.{schemas.SHARD_BUCKET}"])
        actions = actions.filter(pc.is_in(actions.column(2), value_set=pa.array(buckets, pa.string())))
        small = actions.filter(pc.less(actions.column("size_bytes"), SMALL_FILE_BYTES))
        if small.num_rows < FOLD_AT:
            return [], []
        counts = {c["values"]: c["counts"] for c in pc.value_counts(small.column(2)).to_pylist()}
        full = sorted(b for b, n in counts.items() if n >= FOLD_AT)
        every = {c["values"]: c["counts"] for c in pc.value_counts(actions.column(2)).to_pylist()}
        chosen = small.filter(pc.is_in(small.column(2), value_set=pa.array(full, pa.string())))
        return (list(zip(chosen.column("path").to_pylist(), chosen.column(2).to_pylist())),
                [b for b in full if every[b] == counts[b]])

    def write_once(self, table: str, keys: list[str], rows_for: Callable[[pa.Table], pa.Table], *, app_id: str,
                   bucket_prefix: str, metadata: dict[str, str] | None = None, key: str = "uid") -> tuple[int, int]:
        """Write rows into the shards `keys` (shard keys) by `key`, exactly once per `app_id`: rows
        with a new key are appended, rows whose key is there replace those rows. Returns (inserted,
        replaced); (0, 0) when `app_id` was already committed (a repeat, or a concurrent writer of
        the same `app_id` won). `rows_for(current)` picks the rows to write (conformed) from the
        shards' current rows (see `update_shards`)."""
        def change(current: pa.Table):
            take = rows_for(current)
            replaced = pc.sum(pc.is_in(take.column(key), value_set=current.column(key).combine_chunks())).as_py() or 0
            if not replaced:
                return None, take, (take.num_rows, 0)
            kept = current.filter(not_in(current.column(key), take.column(key).combine_chunks()))
            return kept, take, (take.num_rows - replaced, replaced)

        done = self.update_shards(table, keys, change, bucket_prefix=bucket_prefix, metadata=metadata, app_id=app_id)
        return done or (0, 0)

    def commit(self, table: str, attempt, *, data: bool = True):
        """`attempt(latest DeltaTable)`, retried with backoff while concurrent commits conflict.

        An attempt that raised CommitFailedError committed nothing, so a retry against the new
        latest version is safe. `data=False`: not a data commit for crash tests (progress records).
        Out of retries: a RecapError naming the table (nothing of this attempt was committed).
        """
        for n in range(_COMMIT_RETRIES):
            dt = self.delta(table)
            self.check_layout(table, dt)
            try:
                out = attempt(dt)
            except CommitFailedError as exc:
                if n == _COMMIT_RETRIES - 1:
                    raise CommitConflict(f"table {self.path(table)}: {_COMMIT_RETRIES} tries of this commit each "
                                         f"conflicted with a concurrent writer's ({exc}); nothing of it was "
                                         f"committed: rerun to resume") from exc
                time.sleep(min(1.0, 0.05 * 2**n) * (1 + random.random()))
                continue
            if data:
                faults.reached("commit")
            return out
        raise AssertionError("unreachable")

    def read_shards(self, table: str, dt: DeltaTable, keys: list[str], *,
                    columns: list[str] | None = None) -> pa.Table:
        """The rows of the shards `keys` (shard keys) in the snapshot `dt`: all columns, conformed,
        or just `columns` (as stored).

        Files are chosen by partition (the keys' buckets) and by the min/max shard_key statistics
        each file carries in the Delta log (`shard_predicate`); pyarrow then skips row groups by
        their own statistics.
        """
        schema = schemas.TABLES[table]
        if not keys:
            return schema.empty_table().select(columns) if columns else schema.empty_table()
        present = set(dt.schema().to_arrow().names)
        wanted = [c for c in (columns or schema.arrow.names) if c in present]
        dataset = dt.to_pyarrow_dataset(file_pruning_predicate=shard_predicate(keys))
        data = normalize(dataset.to_table(columns=wanted, filter=pc.field(schemas.SHARD_KEY).isin(keys),
                                          use_threads=False))
        return data if columns else conform(data, schema)

    def replace_shards(self, dt: DeltaTable, keys: list[str], data: pa.Table, **kwargs) -> None:
        """Overwrite the rows of the shards `keys` in the snapshot `dt` with `data` in one commit.

        The predicate names the keys' buckets (partitions) and keys: delta-rs rewrites only the
        files holding those shards' rows (keeping their other rows). A concurrent commit that
        touched them makes this one fail with CommitFailedError: run it inside `commit` to retry.
        """
        self.overwrite(dt, data, shards_sql(keys), **kwargs)

    @staticmethod
    def overwrite(dt: DeltaTable, data: pa.Table, predicate: str, **kwargs) -> None:
        """Replace the rows matching the SQL `predicate` in the snapshot `dt` with `data` (sorted by
        shard_key), in one commit; on a thread with a deep stack (see `with_deep_stack`)."""
        with_deep_stack(write_deltalake, dt, _clustered(data), mode="overwrite", predicate=predicate,
                        schema_mode="merge", writer_properties=SHARD_WRITER, **kwargs)

    def append_to(self, dt: DeltaTable, data: pa.Table, **kwargs) -> None:
        """Append `data` (conformed) as a commit on the snapshot `dt` (its version is the one
        conflicts are checked against: run it inside `commit` to retry)."""
        write_deltalake(dt, _clustered(data), mode="append", schema_mode="merge", writer_properties=SHARD_WRITER,
                        **kwargs)

    def delete(self, table: str, shard_ids: Iterable[str], where: str) -> int:
        """DELETE the rows of `shard_ids` matching the SQL predicate `where`; returns rows deleted."""
        keys = sorted({shard_key(s) for s in shard_ids})
        if not keys or not self.exists(table):
            return 0
        predicate = f"{shards_sql(keys)} AND ({where})"
        metrics = self.commit(table, lambda dt: with_deep_stack(dt.delete, predicate))
        return int(metrics.get("num_deleted_rows", 0))

    def rewrite(self, table: str, parts: Iterable[pa.Table], *, keep_app_ids: Iterable[str] = (),
                metadata: dict[str, str] | None = None) -> int:
        """Rewrite `table` in its declared layout from `parts` (conformed tables, e.g. one bucket
        each, streamed: one part in memory at a time), in one commit; returns the rows written.

        The app transactions `keep_app_ids` recorded by the latest version are carried over
        (exactly-once marks survive). A local table is written fresh beside the old one, which is
        then moved to `_migrated/` (kept for rollback; delete it once satisfied): the new log
        starts without the old layout's app transactions, which an in-place overwrite would carry
        into every checkpoint. On object storage the table is overwritten in place (one commit;
        those entries stay).
        """
        schema = schemas.TABLES[table]
        dt = self.delta(table)
        txns = [Transaction(app_id=a, version=v) for a in keep_app_ids
                if (v := dt.transaction_version(a)) is not None]
        written = 0

        def batches():
            nonlocal written
            for part in parts:
                part = _clustered(part)
                written += part.num_rows
                yield from part.to_batches()

        reader = pa.RecordBatchReader.from_batches(schema.arrow, batches())
        kwargs = dict(partition_by=list(schema.partition_by) or None, storage_options=self.storage_options or None,
                      writer_properties=SHARD_WRITER,
                      commit_properties=CommitProperties(app_transactions=txns or None, custom_metadata=metadata))
        if self.is_local:
            fresh = self.root / "_migrated" / f"{table}.new"
            shutil.rmtree(fresh, ignore_errors=True)
            write_deltalake(str(fresh), reader, mode="error", configuration=schema.properties, **kwargs)
            kept = self.root / "_migrated" / f"{table}.{time.strftime('%Y%m%dT%H%M%S')}"
            (self.root / table).rename(kept)
            fresh.rename(self.root / table)
            log.info("rewrite %s: the old table is kept in %s", table, kept)
        else:
            write_deltalake(self.path(table), reader, mode="overwrite", schema_mode="overwrite", **kwargs)
            self.set_properties(table)
        self.forget(table)
        return written

    def set_properties(self, table: str) -> DeltaTable:
        """Give `table` the Delta properties of its schema where an older Recap made it with others;
        returns its latest snapshot."""
        dt = self.delta(table)
        wanted = schemas.TABLES[table].properties
        if any(dt.metadata().configuration.get(k) != v for k, v in wanted.items()):
            dt.alter.set_table_properties(wanted)
            dt = self.delta(table)
        return dt

    def append(self, table: str, data: pa.Table, **kwargs) -> None:
        """Append rows in one commit, retried while a concurrent commit conflicts (appends conflict
        only with a metadata change: a schema evolution, a rewrite)."""
        if data.num_rows == 0:
            return
        self.ensure(table)
        data = _clustered(conform(data, schemas.TABLES[table]))
        # A progress record is not a data commit (progress.record is its own fault point).
        self.commit(table, lambda dt: write_deltalake(dt, data, mode="append", **kwargs), data=table != PROGRESS)
        if table == PROGRESS:
            self.fold_records(table, sorted(set(data.column("stage").to_pylist())))

    def fold_records(self, table: str, partitions: list[str]) -> int:
        """After an append to the `partitions` (values of the table's one partition column) of a
        record table: each holding FOLD_AT files under RECORD_FILE_BYTES or more has them rewritten
        as one, in one commit; returns the files folded.

        Stages record each shard as they finish it, so without this the progress table gains a
        file per shard and stage between maintains, and every pending-work lookup reads them all
        (1.19 s at 2,000 records, linear). As `fold_small_files` does for the shard tables, a
        partition whose files are all small is rewritten whole (its files dropped unscanned), else
        the small files' shards' records are (files pruned by their shard_id statistics). A fold
        is an overwrite, not a delta-rs compaction: delta-rs 1.6 does not check one compaction's
        removes against a concurrent one's, so two compactions of the same files both commit and
        their rows are then there twice (measured: 120 records became 246 million across 4
        writers' folds). Overwrites conflict (the loser's fold is left to the next append or
        `recap maintain`); a concurrent append is untouched (its file is not one the fold read).
        """
        (column,) = schemas.TABLES[table].partition_by

        def attempt(dt: DeltaTable) -> int:
            actions = pa.table(dt.get_add_actions(flatten=True)).select(["path", "size_bytes", f"partition.{column}"])
            actions = actions.filter(pc.is_in(actions.column(2), value_set=pa.array(partitions, pa.string())))
            small = actions.filter(pc.less(actions.column(1), RECORD_FILE_BYTES))
            counts = {c["values"]: c["counts"] for c in pc.value_counts(small.column(2)).to_pylist()} if len(small) else {}
            full = sorted(v for v, n in counts.items() if n >= FOLD_AT)
            if not full:
                return 0
            every = {c["values"]: c["counts"] for c in pc.value_counts(actions.column(2)).to_pylist()}
            where, clauses, folded = None, [], 0
            for value in full:
                here = pc.field(column) == value
                clause = f"{column} = {_sql_string(value)}"
                if every[value] != counts[value]:
                    ids: set[str] = set()
                    for path in small.filter(pc.equal(small.column(2), value)).column(0).to_pylist():
                        with self.open_table_file(table, path) as f:
                            ids.update(pq.read_table(f, columns=["shard_id"]).column(0).unique().to_pylist())
                    here = here & pc.field("shard_id").isin(sorted(ids))
                    clause = f"{clause} AND shard_id IN ({sql_list(sorted(ids))})"
                where = here if where is None else where | here
                clauses.append(f"({clause})")
                folded += counts[value]
            dataset = dt.to_pyarrow_dataset(file_pruning_predicate=[(column, "in", full)])
            rows = conform(normalize(dataset.to_table(filter=where, use_threads=False)),
                           schemas.TABLES[table])
            commit = CommitProperties(custom_metadata={"recap.operation": "fold"},
                                      app_transactions=transactions(dt, f"recap-fold:{table}:", full))
            self.overwrite(dt, rows, " OR ".join(clauses), commit_properties=commit)
            return folded

        try:
            return self.commit(table, attempt, data=False)
        except CommitConflict as exc:
            log.info("fold of %s %s %s left for later: %s", table, column, partitions, exc)
            return 0

    # Small records beside the tables (batches, run summaries, reports) ----------------------

    def _abs(self, rel: str) -> str:
        """A path inside the lake; a relative path that would climb out of it is refused."""
        parts = rel.replace("\\", "/").split("/")
        if any(p == ".." for p in parts) or rel.startswith("/"):
            raise RecapError(f"{rel!r} would leave the lake {self.uri}: run and batch ids are plain names")
        return f"{self._fs_root}/{rel}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: a reader sees the old file or the new one, never half of one."""
        with self.writer(rel) as f:
            f.write(data)

    @contextlib.contextmanager
    def writer(self, rel: str) -> Iterator[pa.NativeFile]:
        """A stream onto `rel`, published atomically when the block ends without an error."""
        path = self._abs(rel)
        if not self.is_local:
            # pyarrow completes an S3 upload on close even after an error, so a stream onto the final
            # key could publish half a file: write a local file, upload it once finished.
            with storage.output_path(f"s3://{path}") as local, pa.OSFile(str(local), "wb") as f:
                yield f
            return
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                yield f
            self.fs.move(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(tmp)

    def read_bytes(self, rel: str) -> bytes | None:
        """The whole file (its length checked: a cut S3 response can end a read short), or None."""
        try:
            with self.fs.open_input_file(self._abs(rel)) as f:
                return storage.read_exact(f, f.size(), 0, f"{self.uri}/{rel}")
        except FileNotFoundError:
            return None

    def open_input(self, rel: str) -> pa.NativeFile:
        """A file inside the lake for random access (`read_at`); FileNotFoundError when absent."""
        return self.fs.open_input_file(self._abs(rel))

    def remove(self, rel: str) -> None:
        """Delete a file beside the tables (never a Delta table's own file); absent is fine."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self._abs(rel))

    def open_table_file(self, table: str, path: str) -> pa.NativeFile:
        """One data file of a Delta table, by the path its add action names, for random access."""
        self.path(table)  # only the lake's own tables
        return self.fs.open_input_file(f"{self._fs_root}/{table}/{path}")

    def write_json(self, rel: str, payload: dict) -> None:
        self.write_bytes(rel, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> dict | None:
        raw = self.read_bytes(rel)
        return None if raw is None else json.loads(raw)

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Relative paths of the files directly under `prefix` ending in `suffix`, sorted."""
        selector = pafs.FileSelector(self._abs(prefix), allow_not_found=True)
        base = len(self._fs_root) + 1
        return sorted(info.path[base:] for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.File and info.path.endswith(suffix))

    def list_dirs(self, prefix: str) -> list[str]:
        """Relative paths of the folders directly under `prefix`, sorted."""
        selector = pafs.FileSelector(self._abs(prefix), allow_not_found=True)
        base = len(self._fs_root) + 1
        return sorted(info.path[base:] for info in self.fs.get_file_info(selector)
                      if info.type == pafs.FileType.Directory)

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(rel, sink.getvalue().to_pybytes())

    def read_parquet(self, rel: str) -> pa.Table:
        return pq.read_table(self._abs(rel), filesystem=self.fs)


def normalize(data: pa.Table) -> pa.Table:
    """Cast the string_view/large types delta-rs can hand back (files an older Recap wrote with MERGE)
    to plain Arrow types."""
    fields = []
    changed = False
    for field in data.schema:
        t = field.type
        if pa.types.is_string_view(t) or pa.types.is_large_string(t):
            t, changed = pa.string(), True
        elif pa.types.is_binary_view(t) or pa.types.is_large_binary(t):
            t, changed = pa.binary(), True
        fields.append(pa.field(field.name, t, field.nullable))
    return data.cast(pa.schema(fields)) if changed else data


def conform(data: pa.Table, schema: schemas.TableSchema) -> pa.Table:
    """Order and cast columns to the table's declared schema; unknown columns are an error.

    A shard table's key and bucket columns are always derived from `shard_id`.
    """
    extra = set(data.column_names) - set(schema.arrow.names)
    if extra:
        raise ValueError(f"columns {sorted(extra)} are not in the {schema.name} table schema")
    if schemas.SHARD_BUCKET in schema.partition_by:
        keys = [shard_key(s) for s in data.column("shard_id").to_pylist()]
        data = data.drop_columns([c for c in data.column_names if c in (schemas.SHARD_KEY, schemas.SHARD_BUCKET)])
        data = data.append_column(schemas.SHARD_KEY, pa.array(keys, pa.string()))
        data = data.append_column(schemas.SHARD_BUCKET, pa.array([schemas.bucket_of(k) for k in keys], pa.string()))
    columns = []
    for field in schema.arrow:
        if field.name in data.column_names:
            columns.append(data.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(data.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema.arrow)


# delta-rs plans a predicate recursively on the calling thread: an IN list of ~8,000 shard keys
# overflowed the main thread's 8 MiB stack (a segfault, seen folding 256 buckets at once; 4,000 keys
# passed). Predicate writes run on a thread whose stack fits the longest list a stage can write.
_PREDICATE_STACK_BYTES = 1024 * 2**20


def with_deep_stack(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on a thread with a 1 GiB stack (reserved, not committed); its result
    or its exception."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised on the caller's thread
            out["error"] = exc

    with _STACK_LOCK:
        previous = threading.stack_size(_PREDICATE_STACK_BYTES)
        try:
            worker = threading.Thread(target=run, name="recap-delta-predicate", daemon=True)
            worker.start()
        finally:
            threading.stack_size(previous)
    worker.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


_STACK_LOCK = threading.Lock()


def bucket_digits(dt: DeltaTable) -> int | None:
    """The digits of a bucketed table's shard_bucket values (2 in tables of Recaps before 16
    buckets); None for a table with no files or not bucketed."""
    if schemas.SHARD_BUCKET not in dt.metadata().partition_columns:
        return None
    values = pa.table(dt.get_add_actions(flatten=True)).column(f"partition.{schemas.SHARD_BUCKET}")
    return pc.max(pc.utf8_length(values)).as_py()


def sql_list(values: Iterable[str]) -> str:
    """`'a', 'b'`: string literals for an SQL IN list."""
    return ", ".join(_sql_string(v) for v in values)


def _sql_string(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def insert_prefix(table: str) -> str:
    """The app-transaction prefix of `insert_new`'s bucket transactions on `table`."""
    return f"recap-insert:{table}:"


def bucket_transactions(dt: DeltaTable, prefix: str, keys: list[str]) -> list[Transaction]:
    """One app transaction per bucket of the shard `keys` (`prefix` + bucket), each one version past
    the snapshot's: two commits that write the same bucket then conflict instead of both committing
    (the loser retries and re-reads its shards). Bounded: one app id per bucket, not per shard."""
    return transactions(dt, prefix, sorted({schemas.bucket_of(k) for k in keys}))


def transactions(dt: DeltaTable, prefix: str, buckets: list[str]) -> list[Transaction]:
    """The app transactions of `bucket_transactions` for the buckets themselves."""
    return [Transaction(app_id=f"{prefix}{b}", version=(dt.transaction_version(f"{prefix}{b}") or 0) + 1)
            for b in buckets]


def shards_sql(keys: list[str]) -> str:
    """The SQL predicate selecting the rows of the shard `keys`: their buckets (partitions), then keys."""
    buckets = sorted({schemas.bucket_of(k) for k in keys})
    return f"{schemas.SHARD_BUCKET} IN ({sql_list(buckets)}) AND {schemas.SHARD_KEY} IN ({sql_list(keys)})"


# Above this many shards in one read, files are pruned by bucket only (a long IN list costs more to
# evaluate against every file's statistics than it saves: such a read spans most files anyway).
_PRUNE_KEYS_MAX = 1000


def shard_predicate(keys: list[str]) -> list[tuple]:
    """File pruning for the shards `keys`: their buckets (partitions), then the files whose min/max
    shard_key statistics in the Delta log admit one of the keys."""
    pruning = [(schemas.SHARD_BUCKET, "in", sorted({schemas.bucket_of(k) for k in keys}))]
    if len(keys) <= _PRUNE_KEYS_MAX:
        pruning.append((schemas.SHARD_KEY, "in", sorted(keys)))
    return pruning


def _clustered(data: pa.Table) -> pa.Table:
    """Rows of a shard table sorted by shard_key, as every file of a bucket is written."""
    return data.sort_by(schemas.SHARD_KEY) if schemas.SHARD_KEY in data.column_names else data


def _key_strings(data: pa.Table, keys: list[str]) -> pa.Array:
    """The key columns of each row as one string (one column: that column as a string)."""
    if len(keys) == 1:
        return data.column(keys[0]).combine_chunks().cast(pa.string())
    return pc.binary_join_element_wise(*[pc.fill_null(data.column(k).cast(pa.string()), "") for k in keys], "\x1f")


def not_in(values: pa.Array, existing: pa.Array) -> pa.Array:
    """Boolean mask: which of `values` are absent from `existing`."""
    if len(existing) == 0:
        return pa.array([True] * len(values), pa.bool_())
    return pc.invert(pc.is_in(values, value_set=existing))
