"""The chain: YAML profiles (filters, order, per-filter thresholds) and a row that makes a filter raise."""

from __future__ import annotations

import numpy as np
import pytest

from recap_tasks import lake as tables
from recap_tasks.config import FilterConfig, RecapConfig
from recap_tasks.errors import RecapError
from recap_tasks.stages.filter import run_filter
from recap_tasks.filters import FilterDecision, PairFilter
from recap_tasks.filters.basic import CaptionLengthFilter
from recap_tasks.filters.chain import build_chain
from tests.filters.util import by_key, make_lake, photo


def test_profiles_pick_filters_and_order():
    assert [f.name for f in build_chain(FilterConfig())] == ["caption_length", "image_size"]
    assert [f.name for f in build_chain(FilterConfig(chain="datacomp"))] == [
        "caption_length", "image_size", "language", "caption_boilerplate", "nsfw", "faces", "image_dedup"]
    with_clip = build_chain(FilterConfig(chain="datacomp", clip_model="/some/clip"))
    assert with_clip[-1].name == "clip_score"


def test_yaml_chain_with_per_filter_thresholds(tmp_path):
    chain_file = tmp_path / "chain.yaml"
    chain_file.write_text("filters:\n  - nsfw: {max_nsfw_score: 0.1}\n  - language\n")
    config = RecapConfig.load(_write(tmp_path, f"filter:\n  chain: {chain_file}\n  max_nsfw_score: 0.9\n"))
    chain = build_chain(config.filter)
    assert [f.name for f in chain] == ["nsfw", "language"] and chain[0].max_score == 0.1


@pytest.mark.parametrize("text, message", [
    ("filters:\n  - nope\n", "unknown filter 'nope'"),
    ("filters:\n  - nsfw: {max_nsfw: 0.1}\n", "unknown filter fields ['max_nsfw']"),
    ("filters: []\n", "non-empty list"),
])
def test_bad_chain_is_a_clear_error(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(RecapError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_chain(FilterConfig(chain=str(path)))
    with pytest.raises(RecapError, match="filter chain 'nosuch' not found"):
        build_chain(FilterConfig(chain="nosuch"))


class ExplodingFilter(PairFilter):
    """Raises on any caption that mentions 'boom' (as a model would on a poisoned input)."""

    name = "exploding"

    def decide(self, batch, images=None):
        captions = batch.column("org_caption").to_pylist()
        if any("boom" in c for c in captions):
            raise ValueError("cannot score this row")
        return [FilterDecision(np.ones(len(captions), dtype=bool), "never", {})]


def test_a_row_that_makes_a_filter_raise_is_rejected_alone(tmp_path, caplog):
    lake = make_lake(tmp_path, {"00000.tar": [
        ("000000001", "a cup of coffee on saucers", photo("coffee")),
        ("000000002", "boom goes the rocket on the pad", photo("rocket")),
        ("000000003", "a cat lying on a chair", photo("chelsea")),
    ]})
    result = run_filter(lake, config=FilterConfig(executor="local"),
                        chain=[CaptionLengthFilter(FilterConfig()), ExplodingFilter()])
    assert result.kept == 2 and result.dropped == {"filter_error:exploding": 1}
    rejected = by_key(lake, tables.REJECTED)
    assert rejected["000000002"]["reason"] == "filter_error:exploding"
    assert "ValueError: cannot score this row" in rejected["000000002"]["detail"]
    assert "filter exploding failed on row" in caplog.text
    v = by_key(lake, tables.FILTER_RESULTS)
    assert v["000000001"]["kept"] and v["000000001"]["caption_words"] == 6  # scores of earlier filters kept


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path
