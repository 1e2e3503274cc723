"""The mapped download's plan (units bounded by max_map_length, file names and shard numbers only),
its per-host politeness across task instances, and its resume, without Airflow's scheduler."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recap_airflow import stages
from recap_tasks import storage
from recap_tasks.config import DownloadConfig
from tests.helpers import jpeg
from tests.http_server import ImageServer

IMAGES = {f"{i}.jpg": jpeg(64, 48, (20 * i, 90, 30)) for i in range(16)}


@pytest.fixture
def server():
    """The test image server, counting how many requests it serves at once (each takes 50 ms)."""
    with ImageServer(IMAGES) as s:
        handler = s.httpd.RequestHandlerClass
        serve, lock = handler.do_GET, threading.Lock()
        s.in_flight = s.most_in_flight = 0

        def do_get(self):
            with lock:
                s.in_flight += 1
                s.most_in_flight = max(s.most_in_flight, s.in_flight)
            try:
                time.sleep(0.05)
                serve(self)
            finally:
                with lock:
                    s.in_flight -= 1

        handler.do_GET = do_get
        yield s


@pytest.fixture
def metadata(tmp_path, server, monkeypatch):
    """Two metadata files (12 and 4 rows) and a config of 4 rows per shard: 3 + 1 shard jobs."""
    (tmp_path / "meta").mkdir()
    for name, images in (("a", range(12)), ("b", range(12, 16))):
        pq.write_table(pa.table({"uid": [f"{name}{i}" for i in images],
                                 "url": [server.url(f"img/{i}.jpg") for i in images],
                                 "text": [f"picture {i}" for i in images]}), tmp_path / "meta" / f"{name}.parquet")
    config = tmp_path / "config.yaml"
    config.write_text("download:\n  allow_private_networks: true\n  samples_per_shard: 4\n  threads: 8\n"
                      "  per_host_connections: 4\n  timeout: 5\n  deadline: 10\n")
    monkeypatch.setenv("RECAP_CONFIG", str(config))
    monkeypatch.delenv("RECAP_DOWNLOAD_DIR", raising=False)
    return tmp_path / "meta"


@pytest.mark.parametrize("per_host, processes, instances, each", [
    (8, 1, 4, 2), (8, 1, 1, 8), (8, 2, 4, 4), (8, 1, 3, 2), (3, 1, 4, 1)])
def test_each_instance_gets_its_share_of_the_per_host_bound(per_host, processes, instances, each):
    config = DownloadConfig(per_host_connections=per_host, processes=processes)
    assert stages.instance_connections(config, instances) == each
    if per_host * processes >= instances:  # together within what one `recap download` may open
        assert instances * each <= per_host * processes


def test_units_are_bounded_and_name_every_shard_once(metadata, tmp_path):
    lake = str(tmp_path / "lake")
    planned = stages.plan_download(source=str(metadata), source_kind="metadata", lake=lake, max_units=3,
                                   instances=4)
    units = planned["units"]
    assert len(units) == 2  # 4 jobs, at most 3 units -> 2 jobs each
    named = [(run["metadata"].rsplit("/", 1)[1], n) for u in units for run in u["runs"] for n in range(*run["shards"])]
    assert named == [("a.parquet", 0), ("a.parquet", 1), ("a.parquet", 2), ("b.parquet", 0)]
    # One download folder per metadata file, under LAKE/_downloads: the source `plan` reads next.
    outs = planned["source"].split(",")
    assert [o.rsplit("/", 1)[1].split("-")[0] for o in outs] == ["a", "b"]
    assert {run["out"] for u in units for run in u["runs"]} == set(outs)
    assert all(o.startswith(str(tmp_path / "lake" / "_downloads")) for o in outs)
    # 2 instances can run at once (fewer units than max_active_tis_per_dagrun): 4 // 2 each.
    assert {u["per_host_connections"] for u in units} == {2}
    assert stages.plan_download(source="x", source_kind="shards", lake=lake, max_units=3, instances=4) == \
        {"source": "x", "units": []}


def test_units_download_within_their_share_and_resume(metadata, tmp_path, server, monkeypatch):
    planned = stages.plan_download(source=str(metadata), source_kind="metadata", lake=str(tmp_path / "lake"),
                                   max_units=1, instances=2)
    (unit,) = planned["units"]
    assert unit["per_host_connections"] == 4  # one unit: the whole bound
    unit = {**unit, "per_host_connections": 2}  # as if two instances ran at once
    summaries = stages.gather_downloads([stages.download_unit(**unit)])
    assert [(s["shards"], s["shards_skipped"], s["successes"]) for s in summaries] == [(3, 0, 12), (1, 0, 4)]
    assert sum(server.hits.values()) == 16
    assert server.most_in_flight == 2  # 8 threads, 2 connections to the host

    # An instance planned before its shards were finished (a retry) skips them: one listing per folder.
    reads, read_bytes = [], storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: reads.append(uri) or read_bytes(uri))
    again = stages.gather_downloads([stages.download_unit(**unit)])
    assert [(s["shards"], s["shards_skipped"], s["count"]) for s in again] == [(3, 3, 0), (1, 1, 0)]
    assert sum(server.hits.values()) == 16  # nothing fetched again
    # A later run over the finished download plans no unit (no `download` instance), the same source.
    replanned = stages.plan_download(source=str(metadata), source_kind="metadata", lake=str(tmp_path / "lake"),
                                     max_units=1, instances=2)
    assert replanned == {"source": planned["source"], "units": []}
    assert not [r for r in reads if r.endswith("_stats.json")]  # no finished shard's stats read


def test_a_partial_download_plans_only_its_unfinished_shards(metadata, tmp_path):
    lake = str(tmp_path / "lake")
    (unit,) = stages.plan_download(source=str(metadata), source_kind="metadata", lake=lake, max_units=1,
                                   instances=1)["units"]
    stages.download_unit(**unit)
    out_a = unit["runs"][0]["out"]
    for name in ("00000", "00002"):
        storage.remove(storage.join(out_a, f"{name}_stats.json"))
    (left,) = stages.plan_download(source=str(metadata), source_kind="metadata", lake=lake, max_units=1,
                                   instances=1)["units"]
    assert [(r["out"], r["shards"]) for r in left["runs"]] == [(out_a, [0, 1]), (out_a, [2, 3])]
    summaries = stages.download_unit(**left)  # one folder: one summary
    assert [(s["shards"], s["shards_skipped"], s["count"]) for s in summaries] == [(2, 0, 8)]
