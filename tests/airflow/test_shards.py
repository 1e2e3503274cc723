"""Listing source shards, finding those the ingest ledger lacks, chunking for max_map_length."""

import os

import pytest

from recap_tasks.stages.ingest import ingest
from recap_tasks.lake import Lake
from recap_tasks.shards import chunk, list_shards, shards_to_ingest, split_sources


def test_chunk_respects_the_cap():
    items = [f"s{i}" for i in range(2500)]
    chunks = chunk(items, max_chunks=1024)
    assert len(chunks) <= 1024 and sum(chunks, []) == items
    assert chunk(items[:3], max_chunks=1024) == [["s0"], ["s1"], ["s2"]]
    assert chunk([], max_chunks=4) == []
    with pytest.raises(ValueError):
        chunk(items, max_chunks=0)


def test_shards_to_ingest_follow_the_ledger(tmp_path, sample_shards):
    lake = Lake(tmp_path / "lake")
    shards = list_shards(f"{sample_shards}/*.tar")
    assert [os.path.basename(s) for s in shards] == ["00000.tar", "00001.tar"]
    assert list_shards(str(sample_shards), limit=1) == shards[:1]
    assert split_sources(" a/*.tar, b/ \n c") == ["a/*.tar", "b/", "c"]
    assert shards_to_ingest(lake, str(sample_shards)) == shards
    ingest([shards[0]], lake, run_id="r1")
    assert shards_to_ingest(lake, str(sample_shards)) == shards[1:]
    os.utime(shards[0], ns=(1, 1))  # a changed shard is pending again
    assert shards_to_ingest(lake, str(sample_shards)) == shards
