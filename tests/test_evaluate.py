"""`recap evaluate clip`: a small CLIP per caption mix, held-out retrieval, errors."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import yaml

from recap_tasks.cli import main
from recap_tasks.config import EvaluateConfig, RecapConfig
from recap_tasks.errors import RecapError
from recap_tasks.evaluate import (clip_section_html, evaluate_clip, heldout_split, latest_clip_evaluation)
from recap_tasks.lake import RECAP, Lake
from recap_tasks.pipeline import run_pipeline

# A few steps of a one-layer model: the tests check the plumbing, not what CLIP learns.
TINY = {"steps": 3, "batch_size": 8, "width": 32, "layers": 1, "heads": 2, "embed_dim": 16, "image_size": 32,
        "patch_size": 16, "context_length": 16}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: one torch thread is faster here than two fighting other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def published_lake(tmp_path_factory, sample_shards, tiny_model):
    lake = Lake(tmp_path_factory.mktemp("evaluate") / "lake")
    # Short recaptions: captioning is most of this fixture's time.
    config = RecapConfig.load(caption={"max_new_tokens": 12, "batch_size": 32})
    run_pipeline([str(sample_shards)], lake, model=str(tiny_model), config=config, run_id="first")
    assert lake.read(RECAP, ["uid"]).num_rows >= 15
    return lake


def _figures(result: dict):
    for r in result["results"]:
        for text_set in ("org", "re"):
            for direction in ("i2t", "t2i"):
                for k in ("r1", "r5", "r10"):
                    yield r["retrieval"][text_set][direction][k]


def test_evaluate_clip_function(published_lake):
    result = evaluate_clip(published_lake, p_values=[0.0, 0.8, 1.0], config=EvaluateConfig(**TINY), run_id="fn")
    assert [r["p"] for r in result["results"]] == [0.0, 0.8, 1.0]
    figures = list(_figures(result))
    assert len(figures) == 3 * 2 * 2 * 3
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in figures)
    rows = result["rows"]
    assert rows["train"] + rows["heldout"] == rows["exported"] == rows["published"]
    assert rows["heldout"] >= 5 and rows["train"] >= 8
    for r in result["results"]:
        assert (r["train_rows"], r["heldout_rows"], r["steps"]) == (rows["train"], rows["heldout"], 3)
        assert math.isfinite(r["final_loss"]) and math.isfinite(r["first_loss"])
    # p is the chance of the original caption: 0 never shows it, 1 always does.
    assert result["results"][0]["original_fraction"] == 0.0
    assert result["results"][2]["original_fraction"] == 1.0

    # Held-out rows are chosen by uid hash alone and never trained on.
    split = pq.read_table(published_lake.root / result["split_file"]).to_pylist()
    train = {r["uid"] for r in split if r["split"] == "train"}
    heldout = {r["uid"] for r in split if r["split"] == "heldout"}
    assert train and heldout and not train & heldout
    assert train | heldout == set(published_lake.uids(RECAP).to_pylist())
    again_train, again_heldout = heldout_split(sorted(train | heldout), fraction=0.15, min_rows=5)
    assert (set(again_train), set(again_heldout)) == (train, heldout)

    written = json.loads((published_lake.root / "_reports/evaluations/clip-fn.json").read_text())
    assert written["results"] == result["results"] and written["config"]["p_values"] == [0.0, 0.8, 1.0]
    assert latest_clip_evaluation(published_lake)["run_id"] == "fn"
    section = clip_section_html(result)
    assert section.count("<tr>") == 2 + 3 and "R@10" in section
    # The run report shows the lake's latest evaluation.
    from recap_tasks.stages.report import build_report

    page = open(build_report(published_lake, run_id="first")).read()
    assert "CLIP trained on this lake" in page and "R@10" in page


def test_evaluate_clip_cli(published_lake, tmp_path, capsys):
    config = tmp_path / "evaluate.yaml"
    config.write_text(yaml.safe_dump({"evaluate": TINY}))
    rc = main(["evaluate", "clip", "--lake", str(published_lake.root), "--config", str(config),
               "--p", "0.5", "0.8", "--run-id", "cli", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    printed = json.loads(out.out)
    assert [r["p"] for r in printed["results"]] == [0.5, 0.8]
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in _figures(printed))
    assert (published_lake.root / "_reports/evaluations/clip-cli.json").is_file()
    assert printed["device"] == "cpu" and printed["config"]["steps"] == 3


@pytest.mark.parametrize("p", ["1.5", "-0.1"])
def test_bad_p_is_one_clean_line(published_lake, capsys, p):
    rc = main(["evaluate", "clip", "--lake", str(published_lake.root), "--p", "0.8", p])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and "evaluate.p_values" in err and p in err and "Traceback" not in err
    with pytest.raises(RecapError, match="evaluate.p_values"):
        evaluate_clip(published_lake, p_values=[float(p)], config=EvaluateConfig(**TINY))


def test_no_published_rows(tmp_path, capsys):
    lake = Lake(tmp_path / "lake")
    (tmp_path / "lake").mkdir()
    with pytest.raises(RecapError, match="nothing published in .*recap publish"):
        evaluate_clip(lake, config=EvaluateConfig(**TINY))
    lake.ensure(RECAP)  # a table with no rows is the same
    rc = main(["evaluate", "clip", "--lake", str(lake.root)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert str(lake.root) in err and "recap publish" in err


def test_too_few_rows_for_a_heldout_split(published_lake):
    n = published_lake.read(RECAP, ["uid"]).num_rows
    config = EvaluateConfig(**TINY, min_heldout_rows=n - 2, min_train_rows=8)
    with pytest.raises(RecapError, match=rf"{n} exported rows .* held-out split of {n - 2} .* leaves 2 to train on"):
        evaluate_clip(published_lake, config=config)


def test_heldout_split_is_stable_as_the_lake_grows():
    small = [f"u{i}" for i in range(200)]
    big = small + [f"v{i}" for i in range(2000)]
    train_s, held_s = heldout_split(small, fraction=0.15, min_rows=5)
    train_b, held_b = heldout_split(big, fraction=0.15, min_rows=5)
    assert not set(train_s) & set(held_s) and len(train_s) + len(held_s) == 200
    assert set(held_s) <= set(held_b)  # a held-out uid stays held out (no top-up at these sizes)
    assert 0.1 < len(held_b) / len(big) < 0.2
    _, tiny_held = heldout_split(small[:10], fraction=0.15, min_rows=5)
    assert len(tiny_held) == 5  # topped up on a small lake


@pytest.mark.parametrize("settings, name", [({"heldout_fraction": 1.0}, "evaluate.heldout_fraction"),
                                            ({"p_values": []}, "evaluate.p_values"),
                                            ({"p_values": [0.5, 0.5]}, "evaluate.p_values"),
                                            ({"width": 30, "heads": 4}, "evaluate.width"),
                                            ({"image_size": 30}, "evaluate.image_size"),
                                            ({"batch_size": 1}, "evaluate.batch_size"),
                                            ({"device": "gpu"}, "evaluate.device"),
                                            ({"steps": 0}, "steps")])
def test_config_is_validated(settings, name):
    with pytest.raises(RecapError, match=name.replace(".", r"\.")):
        EvaluateConfig(**settings)


@pytest.mark.gpu
def test_evaluate_clip_on_cuda(published_lake):
    result = evaluate_clip(published_lake, p_values=[0.8], config=EvaluateConfig(**TINY, device="cuda"), run_id="gpu")
    assert result["device"] == "cuda"
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in _figures(result))
