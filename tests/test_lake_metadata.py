"""Table metadata between maintains stays bounded (issue 29): file statistics only for the pruning
columns, a checkpoint every 10 commits, small files folded per bucket, progress records compacted per
stage; and reads and uploads of a known length are checked."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from recap_tasks import lake as lake_module
from recap_tasks import maintenance, progress, schemas, storage
from recap_tasks.errors import RecapError
from recap_tasks.ids import shard_key
from recap_tasks.lake import FOLD_AT, PROGRESS, Lake, conform
from recap_tasks.maintenance import maintain
from recap_tasks.runs import utcnow


def _shards_in_one_bucket(n: int) -> list[str]:
    """n shard ids whose keys share a bucket (so each commit below writes the same partition)."""
    out, i = [], 0
    while len(out) < n:
        sid = f"fold/{i:06d}.tar"
        if schemas.bucket_of(shard_key(sid)) == "0":
            out.append(sid)
        i += 1
    return out


def _rows(shard_id: str, n: int = 5) -> pa.Table:
    return pa.table({"uid": [f"{shard_id}#{i}" for i in range(n)], "shard_id": [shard_id] * n,
                     "key": [f"{i:09d}" for i in range(n)], "org_caption": ["a dog"] * n})


def _bucket_files(lake: Lake, bucket: str = "0") -> int:
    actions = pa.table(lake.delta("pairs").get_add_actions(flatten=True))
    return sum(1 for b in actions.column(f"partition.{schemas.SHARD_BUCKET}").to_pylist() if b == bucket)


def test_commits_to_one_bucket_keep_it_under_the_fold_threshold(tmp_path):
    lake = Lake(tmp_path / "lake")
    shards = _shards_in_one_bucket(12)
    counts = []
    for sid in shards:
        assert lake.insert_new("pairs", _rows(sid)) == 5
        counts.append(_bucket_files(lake))
    assert max(counts) < FOLD_AT, counts  # 12 commits, never FOLD_AT small files in the bucket
    data = lake.read("pairs", ["uid", "shard_id"])
    assert data.num_rows == 60 and len(set(data.column("uid").to_pylist())) == 60  # nothing lost, none twice
    one = lake.read("pairs", ["uid"], shards=[shards[3]])
    assert sorted(one.column("uid").to_pylist()) == sorted(_rows(shards[3]).column("uid").to_pylist())
    # Folded files are written sorted by shard_key, as maintain leaves them.
    for path in lake.delta("pairs").file_uris():
        keys = pq.read_table(path, columns=[schemas.SHARD_KEY]).column(0).to_pylist()
        assert keys == sorted(keys)
    # Folds are content-preserving rewrites, not data commits: the rows commit count is the writes'.
    ops = [e.get("recap.operation") for e in lake.delta("pairs").history()]
    assert ops.count("fold") >= 3


def test_without_the_fold_each_commit_adds_a_file(tmp_path, monkeypatch):
    """The check above seen failing: with folding off, the bucket holds a file per commit."""
    monkeypatch.setattr(lake_module, "FOLD_AT", 10**9)
    lake = Lake(tmp_path / "lake")
    for sid in _shards_in_one_bucket(6):
        lake.insert_new("pairs", _rows(sid))
    assert _bucket_files(lake) == 6


def _record(lake: Lake, shard_id: str, rows_out: int, stage: str = "ingest") -> None:
    lake.append(PROGRESS, pa.Table.from_pylist([{
        "shard_id": shard_id, "stage": stage, "rows_in": rows_out, "rows_out": rows_out, "rejected": 0,
        "reasons": "{}", "run_id": "r1", "recorded_at": utcnow()}], schema=schemas.PROGRESS.arrow))


def _stage_files(lake: Lake, stage: str = "ingest") -> int:
    actions = pa.table(lake.delta(PROGRESS).get_add_actions(flatten=True))
    return sum(1 for s in actions.column("partition.stage").to_pylist() if s == stage)


def test_per_shard_records_keep_a_stage_under_the_fold_threshold(tmp_path):
    lake = Lake(tmp_path / "lake")
    counts = []
    for i in range(12):
        _record(lake, f"p/{i:05d}.tar", 10)
        counts.append(_stage_files(lake))
    _record(lake, "p/00003.tar", 7)  # a later record of a shard wins after folds, as before them
    _record(lake, "p/00000.tar", 5, stage="filter")  # another stage's partition is its own
    assert max(counts) < FOLD_AT, counts
    latest = {(r["shard_id"], r["stage"]): r["rows_out"] for r in progress.latest(lake).to_pylist()}
    assert len(latest) == 13 and latest[("p/00003.tar", "ingest")] == 7 and latest[("p/00000.tar", "filter")] == 5
    assert all(v == 10 for k, v in latest.items() if k not in {("p/00003.tar", "ingest"), ("p/00000.tar", "filter")})
    assert lake.read(PROGRESS, ["shard_id"]).num_rows == 14  # every record kept: compaction, not dedup
    ops = [e.get("recap.operation") for e in lake.delta(PROGRESS).history()]
    assert ops.count("fold") >= 3


def test_without_the_record_fold_each_record_adds_a_file(tmp_path, monkeypatch):
    """The check above seen failing: with folding off, a stage holds a file per record."""
    monkeypatch.setattr(lake_module, "FOLD_AT", 10**9)
    lake = Lake(tmp_path / "lake")
    for i in range(6):
        _record(lake, f"p/{i:05d}.tar", 10)
    assert _stage_files(lake) == 6


def _record_many(args: tuple[str, int]) -> None:
    root, writer = args
    lake = Lake(root)
    for i in range(15):
        _record(lake, f"w{writer}/{i:05d}.tar", 10)


def test_concurrent_recorders_folding_one_stage_keep_every_record_once(tmp_path):
    import multiprocessing

    root = str(tmp_path / "lake")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_record_many, [(root, w) for w in range(4)])
    lake = Lake(root)
    ids = lake.read(PROGRESS, ["shard_id"]).column("shard_id").to_pylist()
    assert len(ids) == 60 and len(set(ids)) == 60, (len(ids), len(set(ids)))
    assert _stage_files(lake) < FOLD_AT + 4  # each writer may have lost its last fold


def test_two_delta_rs_compactions_of_the_same_files_both_commit(tmp_path):
    """Why folds are overwrites: delta-rs (1.6) lets a compaction commit that removes files a
    concurrent compaction already removed, and the rows are then there twice. If this starts
    failing, delta-rs checks it again (and `recap maintain` may run beside another maintain)."""
    path = str(tmp_path / "t")
    for i in range(4):
        write_deltalake(path, pa.table({"x": [i]}), mode="append")
    first, second = DeltaTable(path), DeltaTable(path)
    first.optimize.compact()
    second.optimize.compact()
    assert DeltaTable(path).to_pyarrow_table().num_rows == 8


def test_tables_carry_stats_for_their_pruning_column_only(tmp_path):
    lake = Lake(tmp_path / "lake")
    lake.insert_new("pairs", _rows("a/00000.tar"))
    dt = lake.delta("pairs")
    assert dt.metadata().configuration == schemas.PAIRS.properties
    actions = pa.table(dt.get_add_actions(flatten=True))
    assert "min.shard_key" in actions.column_names
    assert "min.uid" not in actions.column_names and "min.org_caption" not in actions.column_names


def test_maintain_sets_the_properties_on_an_older_table(tmp_path):
    path = tmp_path / "lake" / "pairs"
    write_deltalake(str(path), conform(_rows("a/00000.tar"), schemas.PAIRS), partition_by=[schemas.SHARD_BUCKET])
    assert "min.uid" in pa.table(DeltaTable(str(path)).get_add_actions(flatten=True)).column_names
    lake = Lake(tmp_path / "lake")
    maintain(lake, tables=["pairs"])
    assert DeltaTable(str(path)).metadata().configuration == schemas.PAIRS.properties


class _ShortFile:
    """A file whose first reads end short, as a cut S3 response does."""

    def __init__(self, data: bytes, short_reads: int):
        self.data, self.short_reads = data, short_reads

    def read_at(self, size, offset):
        if self.short_reads:
            self.short_reads -= 1
            return self.data[offset:offset + size // 2]
        return self.data[offset:offset + size]


def test_a_short_read_is_read_again_then_refused(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    assert storage.read_exact(_ShortFile(b"0123456789", 2), 10, 0, "x") == b"0123456789"
    with pytest.raises(OSError, match="short read: 5 of 10 bytes"):
        storage.read_exact(_ShortFile(b"0123456789", 99), 10, 0, "s3://b/x")


def _hold_marker(lake: Lake, table: str, version: int) -> None:
    from deltalake import CommitProperties, Transaction

    empty = conform(schemas.TABLES[table].empty_table(), schemas.TABLES[table])
    write_deltalake(lake.delta(table), empty, mode="append", schema_mode="merge", commit_properties=CommitProperties(
        app_transactions=[Transaction(app_id=maintenance.LEASE_APP_ID, version=version)]))


def test_a_maintain_refuses_a_table_another_maintain_holds(tmp_path):
    lake = Lake(tmp_path / "lake")
    lake.insert_new("pairs", _rows("a/00000.tar"))
    lake.insert_new("pairs", _rows("b/00000.tar"))
    with maintenance.holding(lake, "pairs"):
        with pytest.raises(RecapError, match="another `recap maintain` has held it since .* --take-over"):
            maintain(lake, tables=["pairs"])
    assert maintain(lake, tables=["pairs"])["pairs"]["files_before"] == 2  # released: the next one runs
    assert lake.read("pairs", ["uid"]).num_rows == 10
    # A hold of a maintain that died: refused while fresh unless taken over, taken over once stale.
    now_ms = int(time.time() * 1000)
    _hold_marker(lake, "pairs", 2 * now_ms + 1)
    with pytest.raises(RecapError, match="another `recap maintain`"):
        maintain(lake, tables=["pairs"])
    maintain(lake, tables=["pairs"], take_over=True)
    _hold_marker(lake, "pairs", 2 * (now_ms - (maintenance.LEASE_HOURS + 1) * 3600 * 1000) + 1)
    maintain(lake, tables=["pairs"])
    assert lake.delta("pairs").transaction_version(maintenance.LEASE_APP_ID) % 2 == 0  # released
    assert lake.read("pairs", ["uid"]).num_rows == 10


def test_two_holds_claimed_at_once_cannot_both_commit(tmp_path):
    """What `holding` relies on: two commits of one app id from the same snapshot, the second fails."""
    from deltalake import CommitProperties, Transaction
    from deltalake.exceptions import CommitFailedError

    lake = Lake(tmp_path / "lake")
    lake.insert_new("pairs", _rows("a/00000.tar"))
    empty = conform(schemas.PAIRS.empty_table(), schemas.PAIRS)
    first, second = DeltaTable(lake.path("pairs")), DeltaTable(lake.path("pairs"))  # two processes' snapshots
    props = CommitProperties(app_transactions=[Transaction(app_id=maintenance.LEASE_APP_ID, version=3)])
    write_deltalake(first, empty, mode="append", schema_mode="merge", commit_properties=props)
    with pytest.raises(CommitFailedError):
        write_deltalake(second, empty, mode="append", schema_mode="merge", commit_properties=props)


def test_a_compaction_that_loses_to_a_write_is_retried_then_one_line(tmp_path, monkeypatch):
    from deltalake.exceptions import CommitFailedError

    lake = Lake(tmp_path / "lake")
    one, two, three = _shards_in_one_bucket(3)
    lake.insert_new("pairs", _rows(one))
    lake.insert_new("pairs", _rows(two))
    real, calls = maintenance.cluster_buckets, []

    def losing_once(dt):
        calls.append(1)
        if len(calls) == 1:
            lake.insert_new("pairs", _rows(three))  # a stage's write lands meanwhile
            raise CommitFailedError("Failed to commit transaction: a concurrent transaction deleted data")
        return real(dt)

    monkeypatch.setattr(maintenance, "cluster_buckets", losing_once)
    out = maintain(lake, tables=["pairs"])["pairs"]
    assert len(calls) == 2 and out["compacted"]["numFilesRemoved"] >= 2
    assert lake.read("pairs", ["uid"]).num_rows == 15

    def always_losing(dt):
        raise CommitFailedError("Failed to commit transaction: a concurrent transaction deleted data")

    monkeypatch.setattr(maintenance, "cluster_buckets", always_losing)
    with pytest.raises(RecapError, match="3 compactions in a row lost to concurrent writes .* rerun `recap maintain`"):
        maintain(lake, tables=["pairs"])
    assert lake.delta("pairs").transaction_version(maintenance.LEASE_APP_ID) % 2 == 0  # the hold was released
