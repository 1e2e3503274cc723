"""recap_pipeline with source kind `metadata` under dag.test(): the download is mapped over units of
shard jobs (at most max_map_length of them), every row is published or rejected with its reason, and a
rerun fetches nothing again; on local paths and in a bucket (moto's S3 server on 127.0.0.1)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tests.dags.conftest import dag_test
from tests.helpers import REPO, jpeg
from tests.http_server import ImageServer
from tests.s3 import s3_env, s3_server  # noqa: F401  (fixtures: the S3 emulator)

IMAGES = {f"{i}.jpg": jpeg(320, 240 + 4 * i, (20 * i, 90, 30)) for i in range(10)}
# 7 rows (one 404) -> 4 shards, 3 rows -> 2 shards: 6 shard jobs in at most 3 units, 2 each.
FILES = {"part-0": [f"{i}.jpg" for i in range(6)] + ["gone"], "part-1": [f"{i}.jpg" for i in range(6, 9)]}
UIDS = sorted(f"{name}-{image}" for name, images in FILES.items() for image in images if image in IMAGES)


def write_metadata(folder, server: ImageServer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, images in FILES.items():
        pq.write_table(pa.table({"uid": [f"{name}-{n}" for n in images],
                                 "url": [server.url(f"img/{n}") if n in IMAGES else server.url("missing")
                                         for n in images],
                                 "text": [f"a small coloured square number {i}" for i in range(len(images))]}),
                       folder / f"{name}.parquet")


def pipeline_env(airflow_env: dict, tmp_path) -> dict:
    config = tmp_path / "config.yaml"
    config.write_text((REPO / "tests" / "tiny-model.yaml").read_text()
                      + "download:\n  allow_private_networks: true\n  samples_per_shard: 2\n")
    return {**airflow_env, "RECAP_CONFIG": str(config), "AIRFLOW__CORE__MAX_MAP_LENGTH": "3"}


def run_twice(conf: dict, env: dict, server: ImageServer, finished) -> str:
    """Run the DAG, check its mapped download and what it published, run it again: no `download`
    instance, nothing fetched and no shard rewritten (`finished()`: each shard's stats file -> when it was written).
    Returns the first run's log."""
    from recap_tasks import lake as tables
    from recap_tasks.lake import Lake
    from recap_tasks.status import lake_status

    result, first = dag_test("recap_pipeline", conf, env, timeout=900)
    assert result["state"].endswith("success"), (result, first[-3000:])
    downloads = {t: s for t, s in result["tasks"].items() if t.startswith("download[")}
    assert downloads == {f"download[{i}]": "success" for i in range(3)}, result["tasks"]
    fetched = dict(server.hits)
    assert sum(fetched.values()) == 10  # every row once: 9 images and the 404
    marks = finished()
    assert len(marks) == 6
    lake = Lake(conf["lake"])
    published = lake.read(tables.RECAP).column("source_uid").to_pylist()
    status = lake_status(lake)
    assert sorted(published) == UIDS
    assert status["ingested"] == 10 and status["published"] == 9 and status["balanced"], status
    assert status["rejected"]["by_stage"]["download"] == {"http_404": 1}
    assert "'failed': 1, 'reasons': {'http_404': 1}" in first  # gather_downloads' summary of part-0

    again, logs = dag_test("recap_pipeline", conf, env, timeout=900)
    assert again["state"].endswith("success"), (again, logs[-3000:])
    # Every shard finished: no unit planned, no `download` instance, and the run goes on.
    ran = {t: s for t, s in again["tasks"].items() if t.startswith("download[")}
    assert set(ran) <= {"download[-1]"} and "success" not in ran.values(), again["tasks"]
    assert again["tasks"]["gather_downloads[-1]"] == "success", again["tasks"]
    assert "6 shards of 2 metadata files, 6 finished before, 0 to do in 0 units" in logs
    assert dict(server.hits) == fetched and finished() == marks
    assert lake_status(lake)["published"] == 9
    return first


def test_mapped_download_publishes_every_row_and_resumes(airflow_env, tmp_path, tiny_model):
    lake = tmp_path / "lake"
    with ImageServer(IMAGES) as server:
        write_metadata(tmp_path / "meta", server)
        conf = {"source": str(tmp_path / "meta"), "source_kind": "metadata", "lake": str(lake),
                "model": str(tiny_model), "runner": "local"}
        run_twice(conf, pipeline_env(airflow_env, tmp_path), server,
                  lambda: {p: p.stat().st_mtime_ns for p in (lake / "_downloads").glob("part-*/*_stats.json")})


def test_mapped_download_in_a_bucket(airflow_env, s3_env, tmp_path, tiny_model):
    """Metadata, download folders and lake in a bucket: the same rows published, the same resume."""
    import os

    s3, bucket = s3_env

    def finished() -> dict:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix="lake/_downloads/").get("Contents", [])
        return {o["Key"]: o["LastModified"] for o in listing if o["Key"].endswith("_stats.json")}

    env = {**pipeline_env(airflow_env, tmp_path),
           **{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}}
    with ImageServer(IMAGES) as server:
        write_metadata(tmp_path / "meta", server)
        for name in FILES:
            s3.upload_file(str(tmp_path / "meta" / f"{name}.parquet"), bucket, f"meta/{name}.parquet")
        conf = {"source": f"s3://{bucket}/meta", "source_kind": "metadata", "lake": f"s3://{bucket}/lake",
                "model": str(tiny_model), "runner": "local"}
        logs = run_twice(conf, env, server, finished)
    assert f"download s3://{bucket}/lake/_downloads/part-0-" in logs
