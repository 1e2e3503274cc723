"""Caption language with fastText lid.176 (lite): English kept, other languages dropped."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recap_tasks import lake as tables
from recap_tasks.config import FilterConfig
from recap_tasks.stages.filter import run_filter
from recap_tasks.filters import ModelLoadError
from recap_tasks.filters.language import LanguageFilter
from tests.filters.util import by_key, make_lake, photo


def _decide(captions, **config):
    [d] = LanguageFilter(FilterConfig(**config)).decide(pa.table({"org_caption": captions}))
    return d


def test_english_kept_other_languages_dropped():
    captions = ["A brown dog running along the beach at sunset",
                "Ein brauner Hund läuft bei Sonnenuntergang am Strand entlang",
                "Un chien brun qui court sur la plage au coucher du soleil",
                "一只棕色的狗在日落时沿着海滩奔跑",
                "Собака бежит по пляжу на закате",
                ""]
    d = _decide(captions)
    assert d.keep.tolist() == [True, False, False, False, False, False] and d.reason == "not_english"
    assert d.scores["english_score"][0] > 0.8 and max(d.scores["english_score"][1:]) < 0.2


def test_threshold_is_configurable():
    d = _decide(["a dog running on the beach"], min_english_score=0.999)
    assert not d.keep[0] and 0.5 < d.scores["english_score"][0] < 0.999


def test_stage_drops_non_english_with_score(tmp_path):
    lake = make_lake(tmp_path, {"00000.tar": [
        ("000000001", "a cup of coffee on a saucer on a wooden table", photo("coffee")),
        ("000000002", "una taza de café sobre un plato en una mesa de madera", photo("rocket")),
    ]})
    result = run_filter(lake, config=FilterConfig(chain="datacomp", executor="local"))
    assert result.dropped == {"not_english": 1}
    v = by_key(lake, tables.FILTER_RESULTS)
    assert v["000000002"]["reason"] == "not_english" and v["000000002"]["english_score"] < 0.1
    assert v["000000001"]["kept"] and v["000000001"]["english_score"] > 0.5


def test_missing_model_file_fails_fast_naming_filter_and_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"filter 'language': cannot load model .*nope\.ftz"):
        LanguageFilter(FilterConfig(language_model=str(tmp_path / "nope.ftz"))).check()


@pytest.mark.shared_data
def test_coco_captions_are_english_and_web_alt_text_is_mixed(shared_data):
    captions = pq.read_table(shared_data / "coco-mini-wds" / "00000.parquet").column("caption").to_pylist()
    d = _decide(captions)
    assert d.keep.mean() > 0.97
    web = [t for t in pq.read_table(shared_data / "cc-web-758.parquet", columns=["alt_text"]).column(0).to_pylist()
           if t and len(t.split()) >= 3]
    w = _decide(web)
    assert 0.2 < w.keep.mean() < 0.98  # real web alt text: mostly English, not all
