"""Does training on recaptions help? Train a small CLIP per caption mix and measure retrieval.

`evaluate_clip` exports the published rows as webdataset shards (`recap_tasks.export`, the same
images and captions a training job gets), splits them by a hash of uid into training and held-out
rows, and for each mix ratio p trains a CLIP from scratch in which every sample shows its original
caption with probability p and its recaption otherwise (`CaptionMixer`; the paper's p = 0.8). Each
model is scored by zero-shot retrieval on the held-out rows, image->text and text->image Recall@1/5/10,
once against the held-out original captions (`org`) and once against their recaptions (`re`): a
recaption-trained model may retrieve recaptions well and alt text badly, or the reverse.

The model (`recap_tasks.clip_model`) is transformers' `CLIPModel` from a small random `CLIPConfig`
trained with its own contrastive loss (open_clip would pull another torch and torchvision); the
tokenizer is word-level, learned from the training rows' captions (both kinds, so every p shares
one vocabulary). At the default size this runs on a CPU in minutes and shows trends on a small lake
only; the paper's scale is a GPU job (`evaluate.device: cuda`, a bigger `evaluate` section).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import logging
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from recap_tasks.clip_model import (RECALL_AT, build_tokenizer, describe_model, image_batch, load_torch, pick_device,
                                    retrieval_recall, sample_text, tokenize, train_clip)
from recap_tasks.config import EvaluateConfig
from recap_tasks.errors import RecapError
from recap_tasks.export import export_webdataset
from recap_tasks.lake import RECAP, Lake
from recap_tasks.runs import check_name, new_run_id, utcnow

log = logging.getLogger(__name__)

EVALUATIONS = "_reports/evaluations"
# Held-out text sets: webdataset field -> what it holds.
TEXT_SETS = {"org": "org.txt", "re": "re.txt"}


def evaluate_clip(lake: Lake, *, p_values: list[float] | tuple[float, ...] | None = None,
                  config: EvaluateConfig | None = None, run_id: str | None = None) -> dict:
    """Train one CLIP per p on the published rows; held-out retrieval per p, written to the lake.

    Args:
        p_values: probabilities of the original caption to compare (default: `config.p_values`).
    """
    config = config or EvaluateConfig()
    if p_values is not None:
        config = dataclasses.replace(config, p_values=tuple(p_values))  # validated there
    run_id = check_name(run_id or new_run_id("eval"), "run id")
    torch = load_torch()
    device = pick_device(torch, config.device)
    started, t0 = utcnow(), time.perf_counter()
    split = _export_split(lake, config)
    export_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    inputs = _prepare(split, config, torch)
    prepare_s = time.perf_counter() - t1
    results = [_train_and_score(p, split, inputs, config, device, torch) for p in config.p_values]
    split_file = _write_split(lake, run_id, split)
    vocab_size = len(inputs.tokenizer["vocab"])
    result = {
        "kind": "clip_retrieval",
        "run_id": run_id,
        "created_at": started.isoformat(),
        "lake": lake.uri,
        "table_version": split.table_version,
        "model": f"transformers CLIPModel, random init, {describe_model(config, vocab_size)}",
        "tokenizer": {"kind": "word-level, lowercased, learned from the training rows' original captions and "
                              "recaptions", "vocab_size": vocab_size},
        "device": device,
        "rows": {"published": split.published, "exported": split.exported, "train": len(split.train),
                 "heldout": len(split.heldout)},
        "split_file": split_file,
        "text_sets": {"org": "held-out original captions", "re": "held-out recaptions"},
        # Recall of a model that ranks at random, to read the figures against.
        "chance": {f"r{k}": round(min(1.0, k / len(split.heldout)), 4) for k in RECALL_AT},
        "results": results,
        "config": dataclasses.asdict(config),
        "timings": {"export_s": round(export_s, 2), "prepare_s": round(prepare_s, 2),
                    "train_eval_s": round(sum(r["seconds"] for r in results), 2),
                    "total_s": round(time.perf_counter() - t0, 2)},
        "path": f"{EVALUATIONS}/clip-{run_id}.json",
    }
    lake.write_json(result["path"], result)
    log.info("evaluate clip: wrote %s/%s", lake.uri, result["path"])
    return result


@dataclass
class _Split:
    """The published rows as exported, split by uid into training and held-out samples."""

    published: int
    exported: int
    table_version: int | None
    train_uids: list[str]
    heldout_uids: list[str]
    train: list[dict]
    heldout: list[dict]


class _Inputs(NamedTuple):
    """What every p shares: the tokenizer, the images as tensors, the tokenized held-out texts."""

    tokenizer: dict
    train_images: object
    heldout_images: object
    heldout_texts: dict[str, dict]


def _export_split(lake: Lake, config: EvaluateConfig) -> _Split:
    """Export the published rows as webdataset shards (what a training job reads) and split them;
    a RecapError when too few are left to train on."""
    published = _published_rows(lake)
    with tempfile.TemporaryDirectory(prefix="recap-evaluate-") as tmp:
        manifest = export_webdataset(lake, tmp, p_original=config.p_values[0])
        samples = read_webdataset(tmp, manifest["shards"])
    train_uids, heldout_uids = heldout_split([s["__key__"] for s in samples], fraction=config.heldout_fraction,
                                             min_rows=config.min_heldout_rows)
    if len(train_uids) < config.min_train_rows:
        raise RecapError(
            f"evaluate clip: {len(samples)} exported rows of {lake.uri} are too few: a held-out split of "
            f"{len(heldout_uids)} (evaluate.heldout_fraction={config.heldout_fraction}, "
            f"evaluate.min_heldout_rows={config.min_heldout_rows}) leaves {len(train_uids)} to train on, fewer "
            f"than evaluate.min_train_rows={config.min_train_rows}: publish more rows or lower those settings")
    by_uid = {s["__key__"]: s for s in samples}
    return _Split(published, len(samples), manifest["table_version"], train_uids, heldout_uids,
                  [by_uid[u] for u in train_uids], [by_uid[u] for u in heldout_uids])


def _prepare(split: _Split, config: EvaluateConfig, torch) -> _Inputs:
    """The tokenizer, learned from the training rows' captions (both kinds, so every p shares one
    vocabulary), and the tensors every p trains and scores on."""
    tokenizer = build_tokenizer([sample_text(s, f) for s in split.train for f in TEXT_SETS.values()], config)
    return _Inputs(tokenizer, image_batch(split.train, config.image_size, torch),
                   image_batch(split.heldout, config.image_size, torch),
                   {name: tokenize(tokenizer, [sample_text(s, field) for s in split.heldout], torch)
                    for name, field in TEXT_SETS.items()})


def _train_and_score(p: float, split: _Split, inputs: _Inputs, config: EvaluateConfig, device: str, torch) -> dict:
    """Train a CLIP at mix ratio `p` and score its held-out retrieval against each text set."""
    t0 = time.perf_counter()
    model, losses, original_fraction = train_clip(split.train, inputs.train_images, inputs.tokenizer, p, config,
                                                  device, torch)
    retrieval = {name: retrieval_recall(model, inputs.heldout_images, texts, device, torch)
                 for name, texts in inputs.heldout_texts.items()}
    seconds = round(time.perf_counter() - t0, 2)
    del model
    log.info("evaluate clip p=%.2f: loss %.3f -> %.3f, org i2t R@1 %.3f, re i2t R@1 %.3f", p, losses[0],
             losses[-1], retrieval["org"]["i2t"]["r1"], retrieval["re"]["i2t"]["r1"])
    return {
        "p": p, "train_rows": len(split.train), "heldout_rows": len(split.heldout), "steps": config.steps,
        "batch_size": min(config.batch_size, len(split.train)), "first_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4), "original_fraction": round(original_fraction, 4),
        "retrieval": retrieval, "seconds": seconds,
    }


def _write_split(lake: Lake, run_id: str, split: _Split) -> str:
    """Write which uid was trained on and which held out, next to the result; its path in the lake."""
    split_file = f"{EVALUATIONS}/clip-{run_id}-split.parquet"
    lake.write_parquet(split_file, pa.table({
        "uid": split.train_uids + split.heldout_uids,
        "split": ["train"] * len(split.train_uids) + ["heldout"] * len(split.heldout_uids),
    }))
    return split_file


def latest_clip_evaluation(lake: Lake) -> dict | None:
    """The newest `recap evaluate clip` result in the lake (by creation time), or None."""
    newest = None
    for rel in lake.list(EVALUATIONS, ".json"):
        if not rel.rsplit("/", 1)[-1].startswith("clip-"):
            continue
        try:
            result = lake.read_json(rel)
        except ValueError:
            log.warning("skipping unreadable evaluation %s", rel)
            continue
        if isinstance(result, dict) and result.get("kind") == "clip_retrieval" and (
                newest is None or str(result.get("created_at")) > str(newest.get("created_at"))):
            newest = result
    return newest


def clip_section_html(result: dict) -> str:
    """An HTML fragment: one row per p, Recall@K per direction and held-out text set."""
    e = html.escape
    sets, dirs = list(TEXT_SETS), ("i2t", "t2i")
    head1 = "<tr><th rowspan=2>p (original caption)</th><th rowspan=2>final loss</th>" + "".join(
        f"<th colspan={len(RECALL_AT)}>{e(d)} · {e(s)}</th>" for s in sets for d in dirs) + "</tr>"
    head2 = "<tr>" + "".join(f"<th>R@{k}</th>" for _ in sets for _ in dirs for k in RECALL_AT) + "</tr>"
    rows = []
    for r in result.get("results", []):
        cells = "".join(f"<td>{float(r['retrieval'][s][d][f'r{k}']):.3f}</td>"
                        for s in sets for d in dirs for k in RECALL_AT)
        rows.append(f"<tr><td>{float(r['p']):.2f}</td><td>{float(r['final_loss']):.3f}</td>{cells}</tr>")
    chance = result.get("chance", {})
    rows_info = result.get("rows", {})
    return (
        "<h2>CLIP trained on caption mixes</h2>"
        f"<p class=muted>Run {e(str(result.get('run_id', '')))} · {e(str(result.get('created_at', '')))} · "
        f"{e(str(result.get('model', '')))} · {e(str(rows_info.get('train', '?')))} training rows, "
        f"{e(str(rows_info.get('heldout', '?')))} held-out rows · "
        f"{e(str(result.get('config', {}).get('steps', '?')))} steps. p is the chance a training sample shows "
        f"its original caption (the paper trained at 0.8). i2t: image to text, t2i: text to image; org / re: "
        f"the held-out text is the original caption / the recaption. Chance: "
        + ", ".join(f"R@{k} {float(chance.get(f'r{k}', 0)):.3f}" for k in RECALL_AT)
        + ".</p><table>" + head1 + head2 + "".join(rows) + "</table>"
    )


def heldout_split(uids: list[str], *, fraction: float, min_rows: int) -> tuple[list[str], list[str]]:
    """(train, held-out) uids, each sorted: uids hashing below `fraction`, topped up to `min_rows`.

    The hash depends on the uid alone, so a uid below the fraction is held out on every run and
    every lake that holds it; the top-up (lowest hashes first) only matters on a small lake.
    """
    ranked = sorted(set(uids), key=_uid_hash)
    k = min(len(ranked), max(min_rows, sum(1 for u in ranked if _uid_hash(u) < fraction)))
    return sorted(ranked[k:]), sorted(ranked[:k])


def _uid_hash(uid: str) -> float:
    return int.from_bytes(hashlib.sha256(b"recap-heldout\0" + uid.encode()).digest()[:8], "big") / 2**64


def read_webdataset(folder: str | Path, shards: list[str]) -> list[dict]:
    """Samples of webdataset tar shards as webdataset's loader groups them: {"__key__", ext: bytes}."""
    samples: dict[str, dict] = {}
    for name in shards:
        with tarfile.open(Path(folder) / name) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(member).read()
    return list(samples.values())


def _published_rows(lake: Lake) -> int:
    rows = lake.read(RECAP, ["uid"]).num_rows  # an absent table reads as empty
    if rows == 0:
        raise RecapError(f"nothing published in {lake.uri}: run `recap publish` first (evaluate clip trains "
                         f"on the published rows)")
    return rows
