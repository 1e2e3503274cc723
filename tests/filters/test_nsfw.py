"""NSFW score with open_nsfw: scores kept, threshold applied, unreadable model fails fast."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from recap_tasks.config import FilterConfig
from recap_tasks.stages.filter import run_filter
from recap_tasks.filters import ModelLoadError
from recap_tasks.filters.chain import decode
from recap_tasks.filters.nsfw import NsfwFilter
from tests.filters.util import make_lake, photo

NAMES = ("astronaut", "coffee", "chelsea", "rocket")


def test_safe_photos_score_low_and_pass():
    flt = NsfwFilter(FilterConfig())
    [d] = flt.decide(pa.table({"uid": list(NAMES)}), [decode(photo(n), 640) for n in NAMES])
    scores = np.asarray(d.scores["nsfw_score"])
    assert d.reason == "nsfw" and d.keep.all()
    assert ((scores >= 0) & (scores < 0.2)).all()
    [again] = flt.decide(pa.table({"uid": ["coffee"]}), [decode(photo("coffee"), 640)])
    assert abs(again.scores["nsfw_score"][0] - scores[1]) < 1e-5  # deterministic, batch-independent


def test_threshold_drops_with_reason():
    scores = NsfwFilter(FilterConfig()).decide(pa.table({"uid": list(NAMES)}),
                                              [decode(photo(n), 640) for n in NAMES])[0].scores["nsfw_score"]
    cut = float(np.median(scores))
    [d] = NsfwFilter(FilterConfig(max_nsfw_score=cut)).decide(pa.table({"uid": list(NAMES)}),
                                                              [decode(photo(n), 640) for n in NAMES])
    assert d.keep.tolist() == (np.asarray(scores) < cut).tolist() and 1 <= (~d.keep).sum() <= 3


def test_unreadable_model_fails_the_run_fast_naming_filter_and_path(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx model")
    lake = make_lake(tmp_path, {"00000.tar": [("000000001", "a cup of coffee on a saucer", photo("coffee"))]})
    with pytest.raises(ModelLoadError, match=rf"filter 'nsfw': cannot load model {bad}"):
        run_filter(lake, config=FilterConfig(chain="datacomp", executor="local", nsfw_model=str(bad)))
    from recap_tasks import lake as tables
    assert lake.read(tables.FILTER_RESULTS).num_rows == 0  # nothing judged


@pytest.mark.shared_data
def test_coco_photos_are_mostly_safe(shared_data):
    import tarfile

    tar = tarfile.open(shared_data / "coco-mini-wds" / "00001.tar")
    images = [decode(tar.extractfile(m).read(), 640) for m in tar.getmembers() if m.name.endswith(".jpg")][:40]
    [d] = NsfwFilter(FilterConfig()).decide(pa.table({"uid": [str(i) for i in range(len(images))]}), images)
    assert np.median(d.scores["nsfw_score"]) < 0.1 and d.keep.mean() > 0.9
