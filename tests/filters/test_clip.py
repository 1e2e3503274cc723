"""CLIP score through the real transformers code path, on a tiny random CLIPModel built here."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from recap_tasks import lake as tables
from recap_tasks.config import FilterConfig
from recap_tasks.stages.filter import run_filter
from recap_tasks.filters import ModelLoadError
from recap_tasks.filters.chain import decode
from recap_tasks.filters.clip import ClipScoreFilter, make_test_clip_model
from tests.filters.util import by_key, make_lake, photo


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_test_clip_model(tmp_path_factory.mktemp("models") / "tiny-clip")


def test_score_is_the_cosine_of_clip_embeddings(tiny_clip):
    import torch
    from transformers import AutoProcessor, CLIPModel

    captions = ["a woman standing in front of a flag", "a cup on a table"]
    images = [decode(photo("astronaut"), 640), decode(photo("coffee"), 640)]
    flt = ClipScoreFilter(FilterConfig(clip_model=str(tiny_clip), min_clip_score=-1.0))
    [d] = flt.decide(pa.table({"org_caption": captions}), images)
    assert d.reason == "low_clip_score" and d.keep.all()
    model, processor = CLIPModel.from_pretrained(tiny_clip), AutoProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        img = model.get_image_features(**processor(images=[im.rgb for im in images], return_tensors="pt"))
        txt = model.get_text_features(**processor(text=captions, return_tensors="pt", padding=True))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    expected = torch.nn.functional.cosine_similarity(img, txt).numpy()
    np.testing.assert_allclose(d.scores["clip_score"], expected, atol=1e-5)
    assert len(set(np.round(d.scores["clip_score"], 6))) == 2


def test_stage_keeps_score_and_applies_threshold(tmp_path, tiny_clip):
    lake = make_lake(tmp_path, {"00000.tar": [
        ("000000001", "a woman standing in front of a flag", photo("astronaut")),
        ("000000002", "a cup of coffee on a small plate", photo("coffee")),
        ("000000003", "a cat lying on a chair by the window", photo("chelsea")),
    ]})
    probe = ClipScoreFilter(FilterConfig(clip_model=str(tiny_clip), min_clip_score=-1.0))
    pairs = lake.read(tables.PAIRS)
    pairs = pairs.take(pa.compute.sort_indices(pairs, [("key", "ascending")]))
    scores = probe.decide(pairs, [decode(photo(n), 640) for n in ("astronaut", "coffee", "chelsea")])[0].scores[
        "clip_score"]
    cut = float(np.median(scores))
    result = run_filter(lake, config=FilterConfig(chain="datacomp", executor="local", clip_model=str(tiny_clip),
                                                  min_clip_score=cut))
    assert result.dropped == {"low_clip_score": 1}
    v = by_key(lake, tables.FILTER_RESULTS)
    got = [v[k]["clip_score"] for k in ("000000001", "000000002", "000000003")]
    np.testing.assert_allclose(got, scores, atol=1e-4)


def test_missing_clip_model_fails_fast(tmp_path):
    lake = make_lake(tmp_path, {"00000.tar": [("000000001", "a cup of coffee on a saucer", photo("coffee"))]})
    with pytest.raises(ModelLoadError, match=rf"filter 'clip_score': cannot load model {tmp_path}/no-clip"):
        run_filter(lake, config=FilterConfig(chain="datacomp", clip_model=str(tmp_path / "no-clip")))
