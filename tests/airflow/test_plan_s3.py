"""The planner (what recap_pipeline and recap_incremental call first) on a source and lake in a bucket."""

import pytest
from tests.s3 import s3_env, s3_server  # noqa: F401  (fixtures: the S3 emulator)

from recap_tasks.lake import Lake
from recap_tasks.stages.ingest import ingest


def test_plan_lists_new_shards_in_a_bucket(s3_env, sample_shards):
    from airflow.sdk.exceptions import AirflowFailException
    from recap_airflow import stages

    s3, bucket = s3_env
    for f in sorted(sample_shards.iterdir()):
        s3.upload_file(str(f), bucket, f"incoming/{f.name}")
    source, lake = f"s3://{bucket}/incoming", f"s3://{bucket}/lake"
    shards = [f"{source}/00000.tar", f"{source}/00001.tar"]
    assert stages.plan(source=source, lake=lake, max_chunks=2, only_new=True) == [[shards[0]], [shards[1]]]
    ingest([shards[0]], Lake(lake))
    assert stages.plan(source=f"{source}/*.tar", lake=lake, max_chunks=2, only_new=True) == [[shards[1]]]
    with pytest.raises(AirflowFailException, match=f"^source not found: s3://{bucket}/elsewhere$"):
        stages.plan(source=f"s3://{bucket}/elsewhere", lake=lake, max_chunks=2)
