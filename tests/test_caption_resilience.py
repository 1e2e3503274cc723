"""Caption stage robustness: OOM back-off, kill-and-resume, hygiene flags, CLIP scores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from recap_tasks import lake as tables
from recap_tasks.stages.caption import _Backoff, is_out_of_memory, run_caption
from recap_tasks.captioning.transformers_backend import TransformersCaptioner
from recap_tasks.config import PAPER_PROMPT, CaptionConfig
from recap_tasks.errors import RecapError
from recap_tasks.stages.filter import run_filter
from recap_tasks.hygiene import clean_caption, distinct_ngram_ratio, echoes_prompt, is_refusal
from recap_tasks.stages.ingest import ingest
from recap_tasks.lake import Lake
from tests.helpers import REPO, jpeg, sample, write_tar


def _lake(tmp_path, n: int, shards: int = 1) -> Lake:
    lake = Lake(tmp_path / "lake")
    for s in range(shards):
        members = []
        for i in range(n):
            members += sample(f"{s:05d}{i:04d}", f"photo {i} of shard {s} with a colored square",
                              jpeg(300 + i % 7, 240, ((i * 37) % 255, 60, 40 * s)))
        ingest([str(write_tar(tmp_path / "src" / f"{s:05d}.tar", members))], lake)
    run_filter(lake)
    return lake


class FlakyMemory(TransformersCaptioner):
    """The real captioner, except that batches above `fits` raise CUDA's out-of-memory error."""

    fits = 2
    calls: list[int]

    def generate(self, prepared):
        import torch

        n = prepared["input_ids"].shape[0]
        self.calls.append(n)
        if n > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().generate(prepared)


def test_out_of_memory_halves_the_batch_and_keeps_it_smaller(tmp_path, tiny_model):
    lake = _lake(tmp_path, 9)
    captioner = FlakyMemory(str(tiny_model), CaptionConfig(batch_size=8))
    captioner.calls = []
    result = run_caption(lake, captioner=captioner, config=CaptionConfig(batch_size=8))
    assert result.captioned == 9 and result.oom_splits >= 1
    assert captioner.calls[:3] == [8, 4, 2]  # halved until it fits...
    assert max(captioner.calls[3:]) <= 2  # ...and later batches start at the size that fit


def test_out_of_memory_on_one_image_is_a_clear_error(tiny_model):
    captioner = FlakyMemory(str(tiny_model), CaptionConfig())
    captioner.calls, captioner.fits = [], 0
    from PIL import Image

    with pytest.raises(RecapError, match="out of memory captioning a single image"):
        _Backoff(captioner, 4).caption([Image.new("RGB", (64, 64))] * 2)


def test_other_errors_are_not_mistaken_for_oom():
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_killed_run_resumes_without_duplicates_or_gaps(tmp_path, tiny_model):
    lake = _lake(tmp_path, 30, shards=2)
    config = tmp_path / "caption.yaml"
    config.write_text("caption:\n  batch_size: 2\n  commit_every: 4\n  max_new_tokens: 96\n"
                      "validate:\n  require_english: false\n")
    cmd = [sys.executable, "-m", "recap_tasks", "caption", "--lake", lake.uri, "--model", str(tiny_model),
           "--config", str(config), "--run-id", "killed"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "RECAP_QUIET": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log_dir = lake.root / "captions" / "_delta_log"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(log_dir.glob("*.json"))) < 3:  # 3 parts committed
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = lake.read(tables.CAPTIONS, ["uid"]).num_rows
    assert 0 < partial < 60, partial
    result = run_caption(lake, model=str(tiny_model), config=CaptionConfig(batch_size=4), run_id="resumed")
    assert result.pending == 60 - partial
    captions = lake.read(tables.CAPTIONS, ["uid", "run_id"]).to_pylist()
    uids = [c["uid"] for c in captions]
    assert len(uids) == len(set(uids)) == 60  # every caption exactly once
    assert {c["run_id"] for c in captions} == {"killed", "resumed"}
    assert run_caption(lake, model=str(tiny_model)).pending == 0  # complete shards are skipped


@pytest.mark.parametrize("raw, clean", [
    ("ASSISTANT: A dog runs on the beach.</s>", "A dog runs on the beach."),
    ("<|im_start|>assistant A red bus <|im_end|>", "A red bus"),
    ("USER: <image> describe ASSISTANT: A cat on a mat", "A cat on a mat"),
    (PAPER_PROMPT + " A bowl of fruit on a table.", "A bowl of fruit on a table."),
    ("  A   tall\n tower  ", "A tall tower"),
])
def test_clean_caption_strips_template_debris_and_prompt_echo(raw, clean):
    assert clean_caption(raw, PAPER_PROMPT) == clean


def test_hygiene_flags_on_crafted_outputs():
    assert is_refusal("I'm sorry, but I can't help with identifying people.")
    assert is_refusal("I cannot see the image clearly.")
    assert not is_refusal("A sorry-looking dog sits in the rain.")
    assert echoes_prompt("Please generate a detailed caption of this image. A dog.", PAPER_PROMPT)
    assert not echoes_prompt("A dog sleeps on a couch.", PAPER_PROMPT)
    assert distinct_ngram_ratio("a dog and a cat " * 12) < 0.2
    assert distinct_ngram_ratio("a large brown dog sleeps on a red couch next to the window") == 1.0


def test_flags_and_clip_scores_are_stored(tmp_path, tiny_model):
    from recap_tasks.filters.clip import make_test_clip_model

    clip = make_test_clip_model(tmp_path / "clip")
    lake = _lake(tmp_path, 4)
    config = CaptionConfig(clip_model=str(clip), batch_size=2)
    assert run_caption(lake, model=str(tiny_model), config=config).captioned == 4
    rows = lake.read(tables.CAPTIONS).to_pylist()
    for r in rows:
        assert -1.0 <= r["re_clip_score"] <= 1.0 and -1.0 <= r["org_clip_score"] <= 1.0
        assert r["clip_model"] == str(clip)
        assert r["is_refusal"] is False and r["prompt_echo"] is False and 0 < r["distinct_ngram_ratio"] <= 1
        # The tiny CLIP reads 64 tokens; the tiny captioner writes 8-128 words.
        assert r["re_clip_truncated"] == (len(r["re_caption"].split()) + 2 > 64)
