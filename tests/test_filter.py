"""Filter stage: DataComp basic rules with reasons and kept scores; configurable; idempotent."""

from tests.helpers import jpeg, sample, write_tar

from recap_tasks import lake as tables
from recap_tasks.config import FilterConfig
from recap_tasks.stages.filter import run_filter
from recap_tasks.stages.ingest import ingest
from recap_tasks.lake import Lake


def _lake(tmp_path) -> Lake:
    shard = write_tar(tmp_path / "src" / "00000.tar",
                      sample("000000001", "a dog running on the beach", jpeg(400, 300))
                      + sample("000000002", "logo", jpeg(400, 300))  # one word
                      + sample("000000003", "a b c", jpeg(400, 300))  # 3 words but 5 characters
                      + sample("000000004", "a small icon of a house", jpeg(120, 90))  # too small
                      + sample("000000005", "a very wide banner of a city", jpeg(1000, 250)))  # aspect 4
    lake = Lake(tmp_path / "lake")
    ingest([str(shard)], lake)
    return lake


def test_basic_rules_drop_with_reasons_and_keep_scores(tmp_path):
    lake = _lake(tmp_path)
    result = run_filter(lake)
    assert result.rows_in == 5 and result.kept == 1
    assert result.dropped == {"caption_too_few_words": 1, "caption_too_short": 1, "image_too_small": 1,
                              "aspect_ratio_too_extreme": 1}
    verdicts = {r["uid"]: r for r in lake.read(tables.FILTER_RESULTS).to_pylist()}
    pairs = {r["key"]: r["uid"] for r in lake.read(tables.PAIRS).to_pylist()}
    kept = verdicts[pairs["000000001"]]
    assert kept["kept"] and kept["reason"] is None
    assert (kept["caption_words"], kept["min_side"]) == (6, 300)
    wide = verdicts[pairs["000000005"]]
    assert wide["reason"] == "aspect_ratio_too_extreme" and abs(wide["aspect_ratio"] - 4.0) < 1e-6
    rejected = {r["key"]: (r["stage"], r["reason"]) for r in lake.read(tables.REJECTED).to_pylist()}
    assert rejected["000000004"] == ("filter", "image_too_small")
    assert "min_side=90" in next(r["detail"] for r in lake.read(tables.REJECTED).to_pylist()
                                  if r["key"] == "000000004")


def test_thresholds_are_configurable(tmp_path):
    lake = _lake(tmp_path)
    result = run_filter(lake, config=FilterConfig(min_caption_words=1, min_caption_chars=1, min_image_side=50,
                                                  max_aspect_ratio=5))
    assert result.kept == 5


def test_rerun_filters_nothing_twice(tmp_path):
    lake = _lake(tmp_path)
    run_filter(lake)
    versions = lake.version(tables.FILTER_RESULTS), lake.version(tables.REJECTED)
    again = run_filter(lake)
    assert again.rows_in == 0
    assert (lake.version(tables.FILTER_RESULTS), lake.version(tables.REJECTED)) == versions


def test_shard_ids_filter_only_those_shards(tmp_path):
    lake = _lake(tmp_path)
    other = write_tar(tmp_path / "src" / "00001.tar", sample("000010001", "a cat asleep on a red sofa", jpeg(400, 300)))
    ingest([str(other)], lake)
    result = run_filter(lake, shard_ids=["src/00001.tar"], config=FilterConfig(executor="local"))
    assert result.rows_in == 1 and result.kept == 1
    assert {r["shard_id"] for r in lake.read(tables.FILTER_RESULTS).to_pylist()} == {"src/00001.tar"}
    assert run_filter(lake, config=FilterConfig(executor="local")).rows_in == 5


def test_funnel_per_run(tmp_path):
    from recap_tasks.stages.filter import funnel

    lake = _lake(tmp_path)
    run_filter(lake, run_id="r1", config=FilterConfig(executor="local"))
    assert funnel(lake) == {"r1": {"rows_in": 5, "rows_out": 1, "dropped": {
        "caption_too_few_words": 1, "caption_too_short": 1, "image_too_small": 1, "aspect_ratio_too_extreme": 1}}}
    assert lake.read_json("_runs/r1/filter_summary.json")["kept"] == 1


def test_bad_filter_settings_are_clear_errors():
    import pytest

    from recap_tasks.errors import RecapError

    with pytest.raises(RecapError, match="max_phash_distance"):
        FilterConfig(max_phash_distance=64)
    with pytest.raises(RecapError, match="executor"):
        FilterConfig(executor="threads")
