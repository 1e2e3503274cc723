"""Table metadata between maintains stays bounded (issue 29): file statistics only for the pruning
columns, a checkpoint every 10 commits, small files folded per bucket; and reads and uploads of a
known length are checked."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from recap_tasks import lake as lake_module
from recap_tasks import schemas, storage
from recap_tasks.ids import shard_key
from recap_tasks.lake import FOLD_AT, Lake, conform
from recap_tasks.maintenance import maintain


def _shards_in_one_bucket(n: int) -> list[str]:
    """n shard ids whose keys share a bucket (so each commit below writes the same partition)."""
    out, i = [], 0
    while len(out) < n:
        sid = f"fold/{i:06d}.tar"
        if schemas.bucket_of(shard_key(sid)) == "00":
            out.append(sid)
        i += 1
    return out


def _rows(shard_id: str, n: int = 5) -> pa.Table:
    return pa.table({"uid": [f"{shard_id}#{i}" for i in range(n)], "shard_id": [shard_id] * n,
                     "key": [f"{i:09d}" for i in range(n)], "org_caption": ["a dog"] * n})


def _bucket_files(lake: Lake, bucket: str = "00") -> int:
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
