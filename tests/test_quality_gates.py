"""Quality gates: each expectation fires on crafted rows; quarantine and reconciliation add up."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from recap_tasks import lake as tables
from recap_tasks import progress
from recap_tasks.config import PAPER_PROMPT, ValidateConfig
from recap_tasks.errors import ValidationFailed
from recap_tasks.stages.ingest import ingest
from recap_tasks.lake import Lake
from recap_tasks.stages.publish import run_publish
from recap_tasks.runs import utcnow
from recap_tasks.status import lake_status
from recap_tasks.stages.validate import check_frame, row_checks, run_validate
from tests.helpers import sample, write_tar

GOOD = ("A brown dog runs across a green park with trees and a wooden bench in the background while "
        "people walk along a path on a sunny afternoon")
BAD_CAPTIONS = {
    "too_short": ("a dog", "expect_column_values_to_be_between(re_length)"),
    "refusal": ("I'm sorry, but I cannot describe this image in any detail for you today",
                "expect_column_values_to_be_in_set(is_refusal)"),
    "prompt_echo": (PAPER_PROMPT + " A dog in a park.", "expect_column_values_to_be_in_set(prompt_echo)"),
    "degenerate": ("the dog is running in the park and the dog is running in the park and the dog is running "
                   "in the park and the dog is running in the park",
                   "expect_column_values_to_be_between(distinct_ngram_ratio)"),
    "not_english": ("Ein brauner Hund rennt über eine grüne Wiese mit Bäumen und einer Holzbank im Hintergrund",
                    "expect_column_values_to_be_between(re_english_score)"),
}
LENIENT = ValidateConfig(max_refusal_fraction=0.5, max_prompt_echo_fraction=0.5, max_degenerate_fraction=0.5,
                         max_non_english_fraction=0.5, max_quarantine_fraction=0.5)


def frame(n: int = 10, **overrides) -> pd.DataFrame:
    df = pd.DataFrame({
        "uid": [f"u{i:03d}" for i in range(n)], "key": [f"{i:09d}" for i in range(n)],
        "url": [f"https://example.com/{i}.jpg" for i in range(n)], "re_caption": [GOOD] * n,
        "org_caption": ["a dog in a park"] * n, "sha256": ["ab" * 32] * n, "model": ["m"] * n,
        "prompt": [PAPER_PROMPT] * n, "re_clip_score": np.full(n, 0.31), "org_clip_score": np.full(n, 0.29),
        "is_refusal": [None] * n, "prompt_echo": [None] * n, "distinct_ngram_ratio": [None] * n,
    })
    for column, values in overrides.items():
        df[column] = values
    df["re_length"] = [len(c.split()) if isinstance(c, str) else 0 for c in df["re_caption"]]
    df["org_length"] = [len(c.split()) for c in df["org_caption"]]
    return df


def run_frame(df: pd.DataFrame, config: ValidateConfig = LENIENT):
    results, quarantine, _ = check_frame(row_checks(df, config), config)
    return {r["expectation"]: r for r in results}, quarantine


def test_clean_batch_passes_every_expectation():
    results, quarantine = run_frame(frame())
    assert all(r["success"] for r in results.values()), [k for k, r in results.items() if not r["success"]]
    assert quarantine == {}
    assert "expect_column_mean_to_be_between(clip_delta)" in results


@pytest.mark.parametrize("case", sorted(BAD_CAPTIONS))
def test_row_level_expectation_quarantines_the_bad_row(case):
    caption, expectation = BAD_CAPTIONS[case]
    captions = [GOOD] * 9 + [caption]
    results, quarantine = run_frame(frame(re_caption=captions))
    assert list(quarantine) == ["u009"] and expectation in quarantine["u009"]
    assert results[expectation]["unexpected_count"] == 1


@pytest.mark.parametrize("case", sorted(BAD_CAPTIONS))
def test_too_many_bad_rows_refuse_the_batch(case):
    caption, expectation = BAD_CAPTIONS[case]
    results, _ = run_frame(frame(re_caption=[GOOD] * 5 + [caption] * 5), ValidateConfig())
    assert not results[expectation]["success"]


def test_aggregate_expectations_fire():
    df = frame(uid=["u000"] * 2 + [f"u{i:03d}" for i in range(2, 10)])
    df.loc[3, "sha256"] = "not-a-hash"
    df.loc[4, "key"] = None
    results, _ = run_frame(df)
    assert not results["expect_column_values_to_be_unique(uid)"]["success"]
    assert not results["expect_column_values_to_match_regex(sha256)"]["success"]
    assert not results["expect_column_values_to_not_be_null(key)"]["success"]


def test_clip_checks_fire_on_range_and_collapse():
    results, quarantine = run_frame(frame(re_clip_score=[0.3] * 9 + [7.5]))
    assert quarantine == {"u009": ["expect_column_values_to_be_between(re_clip_score)"]}
    collapsed, _ = run_frame(frame(re_clip_score=np.full(10, 0.10), org_clip_score=np.full(10, 0.30)))
    assert not collapsed["expect_column_mean_to_be_between(clip_delta)"]["success"]
    # Without a CLIP scorer the CLIP expectations are left out instead of failing on nulls.
    unscored, _ = run_frame(frame(re_clip_score=np.full(10, np.nan), org_clip_score=np.full(10, np.nan)))
    assert not any("clip" in name for name in unscored)


def _crafted_lake(tmp_path, captions: list[str]) -> Lake:
    """A lake whose pairs passed the filter and carry the given captions (written directly)."""
    members = []
    for i in range(len(captions)):
        members += sample(f"{i:09d}", f"a photo of thing number {i}")
    shard = write_tar(tmp_path / "src" / "00000.tar", members)
    lake = Lake(tmp_path / "lake")
    ingest([str(shard)], lake)
    pairs = lake.read(tables.PAIRS, ["uid", "shard_id", "key"]).sort_by("key")
    now = utcnow()
    n = pairs.num_rows
    lake.insert_new(tables.FILTER_RESULTS, pa.table({
        "uid": pairs.column("uid"), "shard_id": pairs.column("shard_id"), "kept": pa.array([True] * n),
        "run_id": pa.array(["f"] * n), "filtered_at": pa.array([now] * n, pa.timestamp("us", tz="UTC"))}))
    lake.insert_new(tables.CAPTIONS, pa.table({
        "uid": pairs.column("uid"), "shard_id": pairs.column("shard_id"), "re_caption": pa.array(captions),
        "model": pa.array(["crafted"] * n), "prompt": pa.array([PAPER_PROMPT] * n), "run_id": pa.array(["c"] * n),
        "captioned_at": pa.array([now] * n, pa.timestamp("us", tz="UTC"))}))
    # The stages record each shard they finish; rows written by hand are recorded the same way.
    shards = sorted(set(pairs.column("shard_id").to_pylist()))
    progress.record(lake, "filter", shards, run_id="f")
    progress.record(lake, "caption", shards, run_id="c")
    return lake


def test_quarantine_and_reconciliation_add_up(tmp_path):
    captions = [GOOD + f" number {i}" for i in range(18)] + [BAD_CAPTIONS["refusal"][0], BAD_CAPTIONS["too_short"][0]]
    lake = _crafted_lake(tmp_path, captions)
    v = run_validate(lake, config=ValidateConfig(max_refusal_fraction=0.1), run_id="b1")
    assert v.batch.success and v.quarantined == 2
    assert v.results[-1]["expectation"] == "row_count_reconciliation" and v.results[-1]["success"]
    published = run_publish(lake, batch_id="b1")
    assert published.inserted == 18
    quarantined = lake.read(tables.QUARANTINE).to_pylist()
    failed = {r["re_caption"]: set(r["failed"]) for r in quarantined}
    assert "expect_column_values_to_be_in_set(is_refusal)" in failed[BAD_CAPTIONS["refusal"][0]]
    assert "expect_column_values_to_be_between(re_length)" in failed[BAD_CAPTIONS["too_short"][0]]
    status = lake_status(lake)
    assert status["balanced"] and status["quarantined"] == 2 and status["published"] == 18
    assert status["ingested"] == status["published"] + status["rejected"]["total"] + status["quarantined"]
    # Quarantined rows are settled: the next validation does not see them again.
    assert run_validate(lake, run_id="b2").batch is None


def test_a_rerun_adopts_the_quarantine_rows_of_a_validate_killed_before_its_record(tmp_path):
    """A validate killed after its quarantine commit, before its batch record, leaves rows whose
    batch_id names no batch. The next validate of those shards adopts them (re-labels and counts
    them), so its batch counts what one uninterrupted validate counts; rows such a batch quarantined
    after the adopting validate started (a validate running alongside, before its record) are not
    its to adopt."""
    from recap_tasks.batches import Batch, all_batches
    from recap_tasks.stages.validate import _write_quarantine

    captions = [GOOD + f" number {i}" for i in range(18)] + [BAD_CAPTIONS["refusal"][0], BAD_CAPTIONS["too_short"][0]]
    config = ValidateConfig(max_refusal_fraction=0.1)
    clean = run_validate(_crafted_lake(tmp_path / "clean", captions), config=config, run_id="clean").batch
    lake = _crafted_lake(tmp_path / "killed", captions)
    run_validate(lake, config=config, run_id="dead")
    (lake.root / "_batches" / "dead.json").unlink()  # as if killed between the commit and the record
    rerun = run_validate(lake, config=config, run_id="rerun")
    assert (rerun.batch.rows, rerun.batch.quarantined, rerun.quarantined) == (clean.rows, clean.quarantined, 2) == \
        (20, 2, 2)
    assert lake.read(tables.QUARANTINE, ["batch_id"]).column("batch_id").to_pylist() == ["rerun", "rerun"]
    run_publish(lake, batch_id="rerun")
    assert lake_status(lake)["quarantined"] == 2 and lake_status(lake)["published"] == 18
    assert [b.batch_id for b in all_batches(lake)] == ["rerun"]

    # Rows of an unrecorded batch quarantined after a validate started are left as they are.
    lake = _crafted_lake(tmp_path / "alongside", captions)
    started = utcnow()
    run_validate(lake, config=config, run_id="alongside")
    (lake.root / "_batches" / "alongside.json").unlink()  # still between its commit and its record
    none = pa.table({c: pa.array([], pa.string()) for c in ("uid", "key", "shard_id", "re_caption", "model")})
    assert _write_quarantine(lake, none, {}, "other", ["src/00000.tar"], before=started) == 0
    assert set(lake.read(tables.QUARANTINE, ["batch_id"]).column("batch_id").to_pylist()) == {"alongside"}
    assert _write_quarantine(lake, none, {}, "other", ["src/00000.tar"], before=utcnow()) == 2  # later: adopted
    assert set(lake.read(tables.QUARANTINE, ["batch_id"]).column("batch_id").to_pylist()) == {"other"}
    assert Batch.load(lake, "alongside") is None


def test_adopting_quarantine_rows_retries_over_a_concurrent_quarantine_commit(tmp_path, monkeypatch):
    """The adopting commit rewrites its shards' quarantine rows: a quarantine row another validate
    commits on those shards between its read and its commit must make it retry, not be overwritten."""
    from recap_tasks.stages.validate import _write_quarantine

    captions = [GOOD + f" number {i}" for i in range(18)] + [BAD_CAPTIONS["refusal"][0], BAD_CAPTIONS["too_short"][0]]
    lake = _crafted_lake(tmp_path, captions)
    run_validate(lake, config=ValidateConfig(max_refusal_fraction=0.1), run_id="dead")
    (lake.root / "_batches" / "dead.json").unlink()
    quarantined = set(lake.uids(tables.QUARANTINE).to_pylist())
    other = sorted(set(lake.uids(tables.CAPTIONS).to_pylist()) - quarantined)[0]
    schema = lake.read(tables.QUARANTINE).schema
    row = lake.read(tables.QUARANTINE).slice(0, 1).to_pylist()[0]
    reads = []
    real_read_shards = Lake.read_shards

    def read_then_a_concurrent_commit(self, table, dt, keys, **kwargs):
        out = real_read_shards(self, table, dt, keys, **kwargs)
        first = table == tables.QUARANTINE and not reads
        reads.append(table)
        if first:  # the first attempt: another writer commits now
            late = {**row, "uid": other, "batch_id": "concurrent", "quarantined_at": utcnow()}
            Lake(lake.uri).insert_new(tables.QUARANTINE, pa.Table.from_pylist([late], schema=schema))
        return out

    monkeypatch.setattr(Lake, "read_shards", read_then_a_concurrent_commit)
    none = pa.table({c: pa.array([], pa.string()) for c in ("uid", "key", "shard_id", "re_caption", "model")})
    assert _write_quarantine(lake, none, {}, "rerun", ["src/00000.tar"], before=utcnow()) == 2
    got = {r["uid"]: r["batch_id"] for r in lake.read(tables.QUARANTINE, ["uid", "batch_id"]).to_pylist()}
    assert got == {**{u: "rerun" for u in quarantined}, other: "concurrent"}
    assert reads.count(tables.QUARANTINE) >= 3  # insert_new's read, then the conflicting commit was retried


def test_refused_batch_publishes_and_quarantines_nothing(tmp_path):
    lake = _crafted_lake(tmp_path, [GOOD] * 6 + [BAD_CAPTIONS["refusal"][0]] * 4)
    with pytest.raises(ValidationFailed, match="is_refusal"):
        run_validate(lake, run_id="bad")
    with pytest.raises(ValidationFailed):
        run_publish(lake, batch_id="bad")
    assert lake.read(tables.RECAP).num_rows == 0 and lake.read(tables.QUARANTINE).num_rows == 0
    status = lake_status(lake)
    assert status["balanced"] and status["captioned_unpublished"] == 10
    assert status["last_batch"]["failed"] == ["expect_column_values_to_be_in_set(is_refusal)"]
