"""Shard scoping: a run for new shards reads only their partitions and small metadata; old lakes migrate."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import write_deltalake

from recap_tasks import progress, schemas
from recap_tasks.batches import all_batches
from recap_tasks.config import RecapConfig
from recap_tasks.lake import Lake, bucket_digits
from recap_tasks.maintenance import migrate
from recap_tasks.pipeline import run_pipeline
from recap_tasks.stages.publish import run_publish
from recap_tasks.ids import shard_id_for, shard_key
from recap_tasks.status import lake_status, reconcile

# The DataComp chain's corpus filters (dedup against the index, boilerplate) with the cheap rules.
CHAIN = {"filters": ["caption_length", "image_size", "caption_boilerplate", "image_dedup"]}


def _config(tmp_path) -> RecapConfig:
    chain = tmp_path / "chain.yaml"
    chain.write_text(json.dumps(CHAIN))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"filter": {"chain": str(chain), "executor": "local"},
                               "validate": {"require_english": False}}))
    return RecapConfig.load(cfg)


def test_incremental_run_never_reads_other_shards(tmp_path, sample_shards, tiny_model):
    config = _config(tmp_path)
    old, new = sorted(sample_shards.glob("*.tar"))
    lake = Lake(tmp_path / "lake")
    first = run_pipeline([str(old)], lake, model=str(tiny_model), config=config, run_id="first")
    assert first["publish"]["inserted"] > 0
    # Every data file of the old shard becomes unreadable: any read of it fails the run.
    key = shard_key(shard_id_for(old))
    damaged = 0
    for table in schemas.SHARD_TABLES:
        if not lake.exists(table):
            continue
        actions = pa.table(lake.delta(table).get_add_actions(flatten=True)).to_pylist()
        for a in actions:  # the files whose statistics say they hold the old shard's rows
            assert a[f"partition.{schemas.SHARD_BUCKET}"] == schemas.bucket_of(a[f"min.{schemas.SHARD_KEY}"])
            if a[f"min.{schemas.SHARD_KEY}"] <= key <= a[f"max.{schemas.SHARD_KEY}"]:
                (lake.root / table / a["path"]).write_bytes(b"not parquet")
                damaged += 1
    assert damaged >= 4  # pairs, filter_results, captions, recap (+ rejected, quarantine if any)
    shutil.rmtree(lake.root / "_blurred", ignore_errors=True)

    second = run_pipeline([str(new)], lake, model=str(tiny_model), config=config, run_id="second")
    assert second["publish"]["inserted"] > 0
    assert second["validate"]["success"]
    status = lake_status(lake)
    assert status["balanced"] and status["shards"]["ingested"] == 2
    assert status["published"] == first["publish"]["inserted"] + second["publish"]["inserted"]
    assert all_batches(lake)[-1].shards == [shard_id_for(new)]
    assert reconcile(lake, [shard_id_for(new)])["balanced"]


def test_a_copy_in_a_later_shard_is_found_through_the_index(tmp_path, sample_shards, tiny_model):
    config = _config(tmp_path)
    old, _ = sorted(sample_shards.glob("*.tar"))
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    copy = shutil.copy(old, copy_dir / old.name)  # the same images under another shard id
    lake = Lake(tmp_path / "lake")
    first = run_pipeline([str(old)], lake, model=str(tiny_model), config=config, run_id="first")
    kept = first["filter"]["kept"]
    assert kept > 0
    second = run_pipeline([str(copy)], lake, model=str(tiny_model), config=config, run_id="second")
    assert second["filter"]["kept"] == 0
    assert second["filter"]["dropped"].get("duplicate_image") == kept
    assert lake_status(lake)["balanced"]


def _to_old_layout(lake: Lake, layout: str) -> None:
    """Rewrite a lake as an older Recap wrote it.

    "unpartitioned": the first layout (unpartitioned tables without shard_key, an ingest ledger of
    JSON files, no progress table or dedup index, no batch shards). "per-shard": one partition per
    shard_key, each write carrying one app transaction per shard (as before shard buckets).
    "256-buckets": partitioned by the shard key's first two hex digits (as before 16 buckets)."""
    from deltalake import CommitProperties, Transaction

    for table in schemas.SHARD_TABLES:
        if not lake.exists(table):
            continue
        data = lake.read(table).drop_columns([schemas.SHARD_BUCKET])
        shutil.rmtree(lake.root / table)
        if layout == "256-buckets":
            old = pc.utf8_slice_codeunits(data.column(schemas.SHARD_KEY), 0, 2)
            txns = [Transaction(app_id=f"recap-insert:{table}:{b}", version=1) for b in set(old.to_pylist())]
            if table == "recap":
                txns += [Transaction(app_id=f"recap-publish:{b.batch_id}", version=1) for b in all_batches(lake)]
            write_deltalake(lake.path(table), data.append_column(schemas.SHARD_BUCKET, old),
                            partition_by=[schemas.SHARD_BUCKET], commit_properties=CommitProperties(app_transactions=txns))
            continue
        if layout == "per-shard":
            keys = sorted(set(data.column(schemas.SHARD_KEY).to_pylist()))
            txns = [Transaction(app_id=f"recap-insert:{table}:{k}", version=1) for k in keys]
            if table == "recap":
                txns += [Transaction(app_id=f"recap-publish:{b.batch_id}", version=1) for b in all_batches(lake)]
            write_deltalake(lake.path(table), data, partition_by=[schemas.SHARD_KEY],
                            commit_properties=CommitProperties(app_transactions=txns))
        else:
            write_deltalake(lake.path(table), data.drop_columns([schemas.SHARD_KEY]))
    if layout != "unpartitioned":
        return
    for rec in progress.latest(lake, stages=("ingest",)).to_pylist():
        import hashlib

        lake.write_json(f"_ledger/ingest/{hashlib.sha1(rec['shard_id'].encode()).hexdigest()}.json",
                        {**rec, "recorded_at": None})
    shutil.rmtree(lake.root / "progress")
    shutil.rmtree(lake.root / "dedup_index")
    for batch in all_batches(lake):
        batch.shards = []
        batch.save(lake)


@pytest.mark.parametrize("layout", ["unpartitioned", "per-shard", "256-buckets"])
def test_migrate_rewrites_an_old_lake_and_runs_go_on(tmp_path, sample_shards, tiny_model, layout):
    config = _config(tmp_path)
    old, new = sorted(sample_shards.glob("*.tar"))
    lake = Lake(tmp_path / "lake")
    first = run_pipeline([str(old)], lake, model=str(tiny_model), config=config, run_id="first")
    published = lake.read("recap").sort_by("uid")
    _to_old_layout(lake, layout)
    try:
        run_pipeline([str(new)], Lake(lake.uri), model=str(tiny_model), config=config, run_id="refused")
    except Exception as exc:  # an old lake is refused with the command that fixes it
        assert "recap maintain --migrate" in str(exc)
    else:
        raise AssertionError("an old-layout lake must be refused before any write")
    out = migrate(Lake(lake.uri))
    assert "into shard buckets" in out["tables"]["pairs"]
    lake = Lake(lake.uri)
    assert lake.read("recap").sort_by("uid").equals(published)
    for table in schemas.SHARD_TABLES:  # no per-shard app transactions survive the rewrite
        if lake.exists(table):
            dt = lake.delta(table)
            assert list(dt.metadata().partition_columns) == [schemas.SHARD_BUCKET]
            assert bucket_digits(dt) in (None, schemas.BUCKET_DIGITS)
            assert all(dt.transaction_version(f"recap-insert:{table}:{k}") is None
                       for k in set(published.column(schemas.SHARD_KEY).to_pylist()))
    # The published batch is still known as published: publishing it again changes nothing.
    again = run_publish(lake, batch_id=all_batches(lake)[0].batch_id)
    if layout != "unpartitioned":  # its app transaction was carried into the new table
        assert again.already_published
    assert (again.inserted, again.updated) == (0, 0)
    status = lake_status(lake)
    assert status["balanced"] and status["published"] == first["publish"]["inserted"]
    assert all_batches(lake)[0].shards == [shard_id_for(old)]
    # The old shard is not ingested again; the new one runs through.
    second = run_pipeline([str(old), str(new)], lake, model=str(tiny_model), config=config, run_id="second")
    assert second["ingest"]["shards_skipped"] == 1 and second["publish"]["inserted"] > 0
    assert lake_status(lake)["balanced"]
    assert migrate(lake)["tables"]["pairs"] == "already in the bucket layout"
    assert pa.table(lake.delta("pairs").get_add_actions(flatten=True)).num_rows >= 2


def test_table_metadata_is_per_bucket_not_per_shard(tmp_path):
    """600 shards land in at most 16 partitions with one app transaction per bucket; a shard's read
    finds only its rows; maintain leaves one file per bucket, sorted by shard_key; inserts stay
    idempotent."""
    import pyarrow.parquet as pq

    from recap_tasks.maintenance import maintain

    lake = Lake(tmp_path / "lake")
    shards = [f"s/{i:05d}.tar" for i in range(600)]
    rows = pa.table({"uid": [f"u{i}" for i in range(600)], "shard_id": shards, "key": [str(i) for i in range(600)]})
    assert sum(lake.insert_new("pairs", rows.slice(start, 200)) for start in range(0, 600, 200)) == 600
    dt = lake.delta("pairs")
    actions = pa.table(dt.get_add_actions(flatten=True))
    buckets = set(actions.column(f"partition.{schemas.SHARD_BUCKET}").to_pylist())
    assert buckets == {schemas.bucket_of(shard_key(s)) for s in shards} and len(buckets) <= 16 ** schemas.BUCKET_DIGITS
    first = schemas.bucket_of(shard_key(shards[0]))
    assert dt.transaction_version(f"recap-insert:pairs:{first}") >= 1
    assert all(dt.transaction_version(f"recap-insert:pairs:{shard_key(s)}") is None for s in shards[:20])
    assert lake.read("pairs", ["uid"], shards=[shards[5]]).column("uid").to_pylist() == ["u5"]

    maintain(lake, tables=["pairs"])
    dt = lake.delta("pairs")
    actions = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
    assert len(actions) == len(buckets)  # one file per bucket after compaction
    for a in actions:
        keys = pq.read_table(lake.root / "pairs" / a["path"], columns=[schemas.SHARD_KEY]).column(0).to_pylist()
        assert keys == sorted(keys) and {schemas.bucket_of(k) for k in keys} == {a[f"partition.{schemas.SHARD_BUCKET}"]}
    assert sorted(lake.read("pairs", ["uid"], shards=[shards[5], shards[7]]).column("uid").to_pylist()) == ["u5", "u7"]
    assert lake.insert_new("pairs", rows) == 0  # idempotent across the rewrite
    assert lake.read("pairs").num_rows == 600
