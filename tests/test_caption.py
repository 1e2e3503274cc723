"""Caption stage on the tiny LLaVA through the real transformers code path."""

import json

import pytest
from tests.helpers import jpeg, sample, write_tar

from recap_tasks import lake as tables
from recap_tasks.stages.caption import run_caption
from recap_tasks.captioning.transformers_backend import TransformersCaptioner
from recap_tasks.config import PAPER_PROMPT, CaptionConfig
from recap_tasks.errors import RecapError
from recap_tasks.stages.filter import run_filter
from recap_tasks.stages.ingest import ingest
from recap_tasks.lake import Lake


def _filtered_lake(tmp_path, n=5):
    members = []
    for i in range(n):
        members += sample(f"0000000{i:02d}", f"photo number {i} of a colored square", jpeg(300 + i, 260, (i * 40, 90, 30)))
    shard = write_tar(tmp_path / "src" / "00000.tar", members)
    lake = Lake(tmp_path / "lake")
    ingest([str(shard)], lake)
    run_filter(lake)
    return lake


def test_test_model_loads_through_auto_classes(tiny_model):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    processor = AutoProcessor.from_pretrained(tiny_model)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert processor.chat_template


def test_captions_every_kept_pair_with_provenance(tmp_path, tiny_model):
    lake = _filtered_lake(tmp_path)
    result = run_caption(lake, model=str(tiny_model), config=CaptionConfig(batch_size=2), run_id="cap1")
    assert result.captioned == 5 and result.rejected == {}
    rows = lake.read(tables.CAPTIONS).to_pylist()
    assert len({r["uid"] for r in rows}) == 5
    for r in rows:
        assert len(r["re_caption"].split()) >= 8  # the test model's min_new_tokens
        assert "ASSISTANT:" not in r["re_caption"]
        assert r["model"] == str(tiny_model) and r["prompt"] == PAPER_PROMPT and r["run_id"] == "cap1"
        gen = json.loads(r["generation"])
        assert gen["do_sample"] is False and gen["max_new_tokens"] == 128


def test_batching_does_not_change_greedy_captions(tmp_path, tiny_model):
    from PIL import Image
    import io

    images = [Image.open(io.BytesIO(jpeg(300, 200 + 30 * i, (i * 50, 20, 200)))).convert("RGB") for i in range(3)]
    captioner = TransformersCaptioner(str(tiny_model), CaptionConfig(max_new_tokens=12))
    batched = captioner.caption(images)
    single = [captioner.caption([im])[0] for im in images]
    assert batched == single  # left padding keeps greedy decoding independent of batch mates


def test_rerun_captions_nothing_twice(tmp_path, tiny_model):
    lake = _filtered_lake(tmp_path, n=3)
    run_caption(lake, model=str(tiny_model))
    version = lake.version(tables.CAPTIONS)
    again = run_caption(lake, model=str(tiny_model))
    assert again.pending == 0 and lake.version(tables.CAPTIONS) == version


def test_vanished_source_is_a_caption_rejection(tmp_path, tiny_model):
    lake = _filtered_lake(tmp_path, n=2)
    (tmp_path / "src" / "00000.tar").unlink()
    result = run_caption(lake, model=str(tiny_model))
    assert result.captioned == 0 and result.rejected == {"image_unavailable": 2}
    assert run_caption(lake, model=str(tiny_model)).pending == 0  # rejected rows are settled


def test_unloadable_model_is_a_clear_error(tmp_path):
    with pytest.raises(RecapError, match="cannot load captioning model"):
        TransformersCaptioner(str(tmp_path / "no-such-model"), CaptionConfig())


def test_test_model_is_laid_out_for_vllm_too(tiny_model):
    from safetensors import safe_open

    with safe_open(str(tiny_model / "model.safetensors"), "pt") as f:
        vision = [k for k in f.keys() if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)  # as released LLaVAs
    text = json.loads((tiny_model / "config.json").read_text())["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] in (32, 64, 80, 96, 112, 128)  # vLLM CPU kernels


def test_missing_vllm_environment_is_one_clear_line(tmp_path, tiny_model, monkeypatch):
    from recap_tasks.captioning import load_captioner

    monkeypatch.delenv("RECAP_VLLM_PYTHON", raising=False)
    config = CaptionConfig(backend="vllm", vllm_python=str(tmp_path / "nowhere" / "python"))
    with pytest.raises(RecapError, match=r"no vLLM environment at .*caption.vllm_python.*RECAP_VLLM_PYTHON.*"
                                         r"\./dev setup-vllm") as err:
        load_captioner(str(tiny_model), config)
    assert "\n" not in str(err.value)


def test_backend_is_a_checked_setting():
    from recap_tasks.cli import _config, build_parser

    with pytest.raises(RecapError, match="caption.backend"):
        CaptionConfig(backend="sglang")
    args = build_parser().parse_args(["caption", "--lake", "L", "--model", "M", "--backend", "vllm"])
    assert _config(args).caption.backend == "vllm"


def test_shard_rows_are_grouped_by_size_then_detail():
    import pyarrow as pa

    from recap_tasks.stages.caption import _by_expected_length

    rows = pa.table({"uid": ["a", "b", "c", "d"], "width": [1000, 100, 1000, 100], "height": [1000, 100, 1000, 100],
                     "image_size": [900_000, 9_000, 100_000, 1_000]})
    assert _by_expected_length(rows).column("uid").to_pylist() == ["d", "b", "c", "a"]
