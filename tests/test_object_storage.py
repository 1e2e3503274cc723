"""The lake on S3: every stage against a local S3 emulator (moto's server on 127.0.0.1)."""

from __future__ import annotations

import pytest

from recap_tasks import lake as tables
from recap_tasks.lake import Lake
from recap_tasks.pipeline import run_pipeline
from recap_tasks.stages.publish import run_publish
from recap_tasks.status import lake_status
from tests.s3 import s3_env, s3_server  # noqa: F401  (fixtures: the S3 emulator)


def test_pipeline_on_s3_lake(s3_env, sample_shards, tiny_model):
    s3, bucket = s3_env
    lake = Lake(f"s3://{bucket}/lake")
    assert not lake.is_local and lake.uri == f"s3://{bucket}/lake"
    summary = run_pipeline([str(sample_shards)], lake, model=str(tiny_model), run_id="s3run")
    assert summary["publish"]["inserted"] == 18
    status = lake_status(lake)
    assert status["balanced"] and status["published"] == 18 and status["shards"]["ingested"] == 2
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="lake/")["Contents"]}
    assert "lake/recap/_delta_log/00000000000000000000.json" in keys
    assert "lake/_reports/runs/s3run/report.html" in keys
    assert any(k.startswith("lake/_reports/data_docs/") for k in keys)
    # Exactly once on S3 too: a repeated publish adds no version.
    assert run_publish(lake, batch_id="s3run").already_published
    assert lake.version(tables.RECAP) == 1  # v0: the empty table, v1: this batch
    # Another reader with its own storage options sees the table.
    from deltalake import DeltaTable

    df = DeltaTable(lake.path(tables.RECAP), storage_options={"AWS_ALLOW_HTTP": "true"}).to_pandas()
    assert len(df) == 18 and df["uid"].is_unique


def test_a_lake_file_is_published_whole_or_not_at_all(s3_env):
    _, bucket = s3_env
    lake = Lake(f"s3://{bucket}/lake")
    with pytest.raises(RuntimeError):
        with lake.writer("_dedup_runs/sha/x.run") as f:
            f.write(b"half of it")
            raise RuntimeError("killed mid-write")
    assert lake.read_bytes("_dedup_runs/sha/x.run") is None
    with lake.writer("_dedup_runs/sha/x.run") as f:
        f.write(b"all of it")
    assert lake.read_bytes("_dedup_runs/sha/x.run") == b"all of it"


def test_bad_lake_uri_is_a_clear_error():
    from recap_tasks.errors import RecapError

    with pytest.raises(RecapError, match="supported lakes are local folders and s3://"):
        Lake("gs://bucket/lake")
