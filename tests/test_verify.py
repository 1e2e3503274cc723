"""`recap status --verify` fails, naming the shard and the kind of loss, when a lake's rows do not add up."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, write_deltalake

from recap_tasks.cli import main
from recap_tasks.lake import Lake
from recap_tasks.pipeline import run_pipeline
from tests.helpers import REPO


@pytest.fixture(scope="module")
def clean_lake(tmp_path_factory, sample_shards, tiny_model):
    lake = Lake(tmp_path_factory.mktemp("verify") / "lake")
    run_pipeline([str(sample_shards)], lake, model=str(tiny_model), run_id="clean")
    assert lake.read("recap").num_rows > 0
    return lake


def _copy(clean_lake: Lake, tmp_path) -> Lake:
    shutil.copytree(clean_lake.root, tmp_path / "lake")
    return Lake(tmp_path / "lake")


def _verify(lake: Lake, capsys) -> tuple[int, str]:
    code = main(["status", "--verify", "--lake", str(lake.root)])
    return code, capsys.readouterr().out


def test_a_clean_lake_verifies_and_exits_0(clean_lake):
    # In a child process: the exit status a scheduled check sees (no delta-rs abort at exit).
    proc = subprocess.run([sys.executable, "-m", "recap_tasks", "status", "--verify", "--lake", str(clean_lake.root)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verified: yes" in proc.stdout and "PROBLEM" not in proc.stdout
    assert "recap" in proc.stdout and "rows checked" in proc.stdout


def _delete_one(lake: Lake, table: str) -> dict:
    """Delete one row of `table` behind Recap's back (a bad manual DELETE); returns it."""
    row = lake.read(table).slice(0, 1).to_pylist()[0]
    DeltaTable(lake.path(table)).delete(f"uid = '{row['uid']}'")
    return row


def test_a_deleted_published_row_is_lost(clean_lake, tmp_path, capsys):
    lake = _copy(clean_lake, tmp_path)
    row = _delete_one(lake, "recap")
    code, out = _verify(lake, capsys)
    assert code == 1
    assert f"PROBLEM lost in recap, shard {row['shard_id']}" in out
    assert "neither published nor quarantined" in out and "verified: NO" in out


def test_a_duplicated_published_row_is_found(clean_lake, tmp_path, capsys):
    lake = _copy(clean_lake, tmp_path)
    recap = lake.read("recap")
    row = recap.filter(pc.equal(recap.column("uid"), recap.column("uid")[0]))
    write_deltalake(lake.path("recap"), row, mode="append")
    code, out = _verify(lake, capsys)
    assert code == 1
    assert f"PROBLEM duplicated in recap, shard {row.column('shard_id')[0].as_py()}" in out


def test_a_deleted_caption_row_is_lost(clean_lake, tmp_path, capsys):
    lake = _copy(clean_lake, tmp_path)
    row = _delete_one(lake, "captions")
    code, out = _verify(lake, capsys)
    assert code == 1
    assert f"PROBLEM lost in captions, shard {row['shard_id']}" in out


def test_verify_json_lists_the_problems(clean_lake, tmp_path, capsys):
    import json

    lake = _copy(clean_lake, tmp_path)
    row = _delete_one(lake, "pairs")
    code = main(["status", "--verify", "--json", "--lake", str(lake.root)])
    status = json.loads(capsys.readouterr().out)
    assert code == 1 and not status["balanced"]
    kinds = {(p["table"], p["kind"], p["shard"]) for p in status["verified"]["problems"]}
    assert ("pairs", "lost", row["shard_id"]) in kinds


def test_a_recaptioned_uid_replaces_its_published_row(clean_lake, tmp_path):
    """Publish replaces a published uid whose caption changed (a predicate overwrite of its shard's
    rows) and leaves every other row as it was."""
    from recap_tasks.batches import Batch, write_uids
    from recap_tasks.stages.publish import run_publish

    lake = _copy(clean_lake, tmp_path)
    before = lake.read("recap").sort_by("uid")
    target = before.column("uid")[0].as_py()
    shard = before.column("shard_id")[0].as_py()
    DeltaTable(lake.path("captions")).update(updates={"re_caption": "'a new caption of the image'"},
                                             predicate=f"uid = '{target}'")
    batch = Batch(batch_id="recaption", rows=1, success=True, validated_at="9999", shards=[shard])
    write_uids(lake, batch, pa.array([target], pa.string()))
    batch.save(lake)
    result = run_publish(lake, batch_id="recaption")
    assert (result.inserted, result.updated) == (0, 1)
    after = lake.read("recap").sort_by("uid")
    assert after.num_rows == before.num_rows
    new = after.filter(pc.equal(after.column("uid"), target)).to_pylist()
    assert [r["re_caption"] for r in new] == ["a new caption of the image"]
    rest = pc.not_equal(after.column("uid"), target)
    keep = ["uid", "re_caption", "shard_id", "publish_run_id"]
    assert after.filter(rest).select(keep).equals(before.filter(pc.not_equal(before.column("uid"), target)).select(keep))


def test_balanced_is_false_when_a_row_is_in_two_places_or_a_record_overshoots(clean_lake, tmp_path):
    """The invariant the other tests lean on, seen failing: reconcile's `balanced` with a uid in two
    places, and the status summary's with a stage that settled more rows than it was given."""
    from recap_tasks import progress
    from recap_tasks.status import lake_status, reconcile

    lake = _copy(clean_lake, tmp_path)
    shards = sorted(set(lake.read("pairs", ["shard_id"]).column("shard_id").to_pylist()))
    assert reconcile(lake, shards)["balanced"] and lake_status(lake)["balanced"]
    recap = lake.read("recap")
    write_deltalake(lake.path("recap"), recap.slice(0, 1), mode="append")  # one uid published twice
    assert not reconcile(Lake(lake.root), shards)["balanced"]

    lake = _copy(clean_lake, tmp_path / "second")
    rec = progress.latest(lake, shard_ids=shards[:1], stages=("filter",)).to_pylist()[0]
    lake.append("progress", pa.Table.from_pylist([{**rec, "rows_in": rec["rows_in"] + 5,
                                                   "recorded_at": rec["recorded_at"].replace(year=2100)}]))
    status = lake_status(Lake(lake.root))
    assert not status["balanced"] and status["unbalanced_shards"] == shards[:1]
