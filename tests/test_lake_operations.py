"""Publishing under concurrency, maintenance, time travel and webdataset export."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import tarfile

import pytest
from PIL import Image

from recap_tasks import lake as tables
from recap_tasks.errors import RecapError
from recap_tasks.export import CaptionMixer, export_webdataset
from recap_tasks.lake import Lake
from recap_tasks.maintenance import history, maintain, snapshot
from recap_tasks.pipeline import run_pipeline
from recap_tasks.stages.publish import run_publish
from recap_tasks.stages.validate import run_validate
from tests.helpers import jpeg, sample, write_tar


@pytest.fixture(scope="module")
def published_lake(tmp_path_factory, sample_shards, tiny_model):
    lake = Lake(tmp_path_factory.mktemp("ops") / "lake")
    run_pipeline([str(sample_shards)], lake, model=str(tiny_model), run_id="first")
    return lake


def _publish_in_child(lake_uri: str, batch_id: str, queue) -> None:
    try:
        queue.put((batch_id, run_publish(Lake(lake_uri), batch_id=batch_id).summary()))
    except Exception as exc:  # report, don't hang the parent
        queue.put((batch_id, repr(exc)))


def test_concurrent_publishers_both_commit(tmp_path, tiny_model):
    from recap_tasks.stages.caption import run_caption
    from recap_tasks.stages.filter import run_filter
    from recap_tasks.stages.ingest import ingest

    lake = Lake(tmp_path / "lake")
    for shard in range(2):
        members = []
        for i in range(3):
            members += sample(f"{shard:05d}{i:04d}", f"a photo of object {i} in shard {shard}",
                              jpeg(320, 240, (80 * i, 40 * shard, 90)))
        ingest([str(write_tar(tmp_path / "src" / f"{shard:05d}.tar", members))], lake)
        run_filter(lake)
        run_caption(lake, model=str(tiny_model))
        run_validate(lake, run_id=f"batch{shard}")  # batch1 re-checks batch0's rows: they overlap
    ctx = mp.get_context("spawn")  # deltalake must not be forked
    queue = ctx.Queue()
    procs = [ctx.Process(target=_publish_in_child, args=(lake.uri, b, queue)) for b in ("batch0", "batch1")]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(r, dict) for r in results.values()), results
    dt = lake.delta(tables.RECAP)
    # Whichever committed first holds its app transaction; if batch1 (a superset) won, batch0's MERGE
    # found every row already published and committed nothing, which is still exactly once.
    committed = {b for b in ("batch0", "batch1") if dt.transaction_version(f"recap-publish:{b}") == 1}
    assert "batch1" in committed or committed == {"batch0", "batch1"}, (committed, results)
    df = dt.to_pandas()
    assert len(df) == 6 and df["uid"].is_unique
    from recap_tasks.batches import Batch

    assert Batch.load(lake, "batch0").published and Batch.load(lake, "batch1").published


def test_history_and_time_travel(published_lake):
    lake = published_lake
    versions = history(lake, "recap")
    # Version 0 creates the empty table (every table is created up front, before any writer races).
    assert versions[-1]["version"] == 0 and versions[-1]["operation"] == "CREATE TABLE"
    assert versions[-2]["version"] == 1 and versions[-2]["batch_id"] == "first"
    assert snapshot(lake, "recap", version=0).num_rows == 0
    assert snapshot(lake, "recap", version=1).num_rows == 18
    with pytest.raises(RecapError, match="cannot load 'recap' at 99"):
        snapshot(lake, "recap", version=99)


def test_maintain_compacts_and_guards_retention(published_lake):
    lake = published_lake
    with pytest.raises(RecapError, match="below 168 h"):
        maintain(lake, retention_hours=1)
    before = lake.version(tables.PAIRS)
    report = maintain(lake, tables=["pairs"])
    assert report["pairs"]["files_after"] <= report["pairs"]["files_before"]
    assert report["pairs"]["vacuumed"] == 0  # nothing is older than a week
    assert lake.read(tables.PAIRS).num_rows == 21 and lake.version(tables.PAIRS) >= before
    with pytest.raises(RecapError, match="unknown tables"):
        maintain(lake, tables=["nope"])


def test_export_webdataset_with_both_captions(published_lake, tmp_path):
    manifest = export_webdataset(published_lake, tmp_path / "wds", shard_size=10)
    assert manifest["rows"] == 18 and manifest["shards"] == ["00000.tar", "00001.tar"]
    with tarfile.open(tmp_path / "wds" / "00000.tar") as tf:
        names = tf.getnames()
        first = names[0].split(".")[0]
        assert [n for n in names if n.startswith(first)] == [f"{first}.jpg", f"{first}.org.txt", f"{first}.re.txt",
                                                             f"{first}.json"]
        image = Image.open(io.BytesIO(tf.extractfile(f"{first}.jpg").read()))
        assert image.size[0] >= 200
        meta = json.loads(tf.extractfile(f"{first}.json").read())
        assert meta["uid"] == first
        sample_ = {"org.txt": tf.extractfile(f"{first}.org.txt").read(),
                   "re.txt": tf.extractfile(f"{first}.re.txt").read()}
    picks = [CaptionMixer(0.8, seed=s)(dict(sample_))["txt"] for s in range(2000)]
    share = sum(p == sample_["org.txt"].decode() for p in picks) / len(picks)
    assert 0.76 < share < 0.84
