"""Validate gates publishing; publish MERGEs by uid exactly once; the table reads back everywhere."""

import json

import pytest
from tests.helpers import jpeg, sample, write_tar
from deltalake import DeltaTable

from recap_tasks import lake as tables
from recap_tasks.batches import all_batches
from recap_tasks.stages.caption import run_caption
from recap_tasks.config import ValidateConfig
from recap_tasks.errors import ValidationFailed
from recap_tasks.stages.filter import run_filter
from recap_tasks.stages.ingest import ingest
from recap_tasks.lake import Lake
from recap_tasks.stages.publish import run_publish
from recap_tasks.stages.validate import run_validate

RELEASED = ["url", "re_caption", "org_caption", "sha256", "key", "re_clip_score", "org_clip_score", "re_length",
            "org_length"]


@pytest.fixture
def captioned_lake(tmp_path, tiny_model):
    members = []
    for i in range(4):
        members += sample(f"0000000{i:02d}", f"a square of color number {i}", jpeg(320, 240, (60 * i, 10, 90)))
    shard = write_tar(tmp_path / "src" / "00000.tar", members)
    lake = Lake(tmp_path / "lake")
    ingest([str(shard)], lake)
    run_filter(lake)
    run_caption(lake, model=str(tiny_model))
    return lake


def test_validated_batch_publishes_released_columns(captioned_lake):
    lake = captioned_lake
    v = run_validate(lake, run_id="b1")
    assert v.batch.success and v.batch.rows == 4
    assert {r["expectation"] for r in v.results} >= {"expect_column_values_to_be_unique(uid)",
                                                     "expect_column_values_to_be_between(re_length)"}
    assert v.batch.report and v.batch.report.endswith(".html")
    p = run_publish(lake, batch_id="b1", run_id="p1")
    assert p.inserted == 4
    table = DeltaTable(lake.path(tables.RECAP)).to_pandas()
    assert list(table.columns[: len(RELEASED)]) == RELEASED
    assert table["uid"].is_unique and table["model"].notna().all()
    row = table.iloc[0]
    assert row["re_length"] == len(row["re_caption"].split())
    assert row["org_length"] == len(row["org_caption"].split())
    assert row["publish_run_id"] == "p1"


def test_failing_batch_is_not_published(captioned_lake):
    lake = captioned_lake
    with pytest.raises(ValidationFailed, match="re_length"):
        # English off as in tests/tiny-model.yaml: the random captions' English score is noise.
        run_validate(lake, config=ValidateConfig(max_caption_words=3, require_english=False), run_id="bad")
    assert all_batches(lake)[-1].failed == ["expect_column_values_to_be_between(re_length)"]
    with pytest.raises(ValidationFailed, match="failed validation"):
        run_publish(lake, batch_id="bad")
    assert not lake.exists(tables.RECAP)


def test_repeated_publish_adds_no_version_and_no_rows(captioned_lake):
    lake = captioned_lake
    run_validate(lake, run_id="b1")
    first = run_publish(lake, batch_id="b1")
    again = run_publish(lake, batch_id="b1")
    assert again.already_published and again.version == first.version
    # Even if the batch record is lost, the table's app transaction makes the retry a no-op.
    record = lake.root / "_batches" / "b1.json"  # a local lake
    raw = json.loads(record.read_text())
    raw["published"] = False
    record.write_text(json.dumps(raw))
    retry = run_publish(lake, batch_id="b1")
    assert retry.already_published
    dt = DeltaTable(lake.path(tables.RECAP))
    assert dt.version() == first.version and len(dt.to_pandas()) == 4


def test_published_table_reads_back_with_pyarrow_pandas_polars(captioned_lake):
    import polars as pl
    import pyarrow.dataset as ds

    lake = captioned_lake
    run_validate(lake, run_id="b1")
    run_publish(lake, batch_id="b1")
    path = lake.path(tables.RECAP)
    arrow = DeltaTable(path).to_pyarrow_dataset().to_table(use_threads=False)
    assert arrow.num_rows == 4
    assert len(DeltaTable(path).to_pandas()) == 4
    assert pl.read_delta(path).height == 4
    assert ds.dataset(DeltaTable(path).file_uris(), format="parquet").count_rows() == 4


def test_a_validate_with_nothing_to_check_writes_no_batch(captioned_lake, tiny_model, capsys):
    """Issue 19, 6: with nothing pending, validate writes no batch (an empty one became the lake's
    "last batch" and was listed in the report), says so in one line and exits 0; `recap run` then
    publishes nothing and reports nothing new."""
    from recap_tasks.cli import main
    from recap_tasks.pipeline import run_pipeline
    from recap_tasks.status import lake_status

    lake = captioned_lake
    run_validate(lake, run_id="b1")
    run_publish(lake, batch_id="b1")
    before = sorted(p.name for p in (lake.root / "_batches").iterdir())
    nothing = run_validate(lake, run_id="b2")
    assert nothing.batch is None and nothing.summary()["batch_id"] is None
    assert "nothing to validate" in nothing.note
    capsys.readouterr()
    assert main(["validate", "--lake", str(lake.root), "--run-id", "b3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("nothing to validate in ") and "no batch written" in out[0], out
    assert main(["validate", "--lake", str(lake.root), "--shard", "src/00000.tar"]) == 0
    assert capsys.readouterr().out.strip() == \
        "nothing to validate in shard src/00000.tar: no captioned rows wait for publishing; no batch written"
    assert sorted(p.name for p in (lake.root / "_batches").iterdir()) == before
    assert [b.batch_id for b in all_batches(lake)] == ["b1"] and lake_status(lake)["last_batch"]["batch_id"] == "b1"
    assert not (lake.root / "_reports" / "runs" / "b2").exists()
    # `recap run` over the same (unchanged) source: nothing new anywhere, no batch, no publish.
    version = DeltaTable(lake.path(tables.RECAP)).version()
    summary = run_pipeline([str(lake.root.parent / "src")], lake, model=str(tiny_model), run_id="again")
    assert summary["validate"]["batch_id"] is None and summary["publish"] is None and summary["report"] is None
    assert [b.batch_id for b in all_batches(lake)] == ["b1"]
    assert DeltaTable(lake.path(tables.RECAP)).version() == version and summary["status"]["published"] == 4
    capsys.readouterr()
    assert main(["run", str(lake.root.parent / "src"), "--lake", str(lake.root), "--model", str(tiny_model)]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["publish"] is None
    assert "quality report : none: nothing to validate in " in printed.err
    assert [b.batch_id for b in all_batches(lake)] == ["b1"]
