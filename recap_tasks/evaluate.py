"""Does training on recaptions help? Train a small CLIP per caption mix and measure retrieval.

`evaluate_clip` exports the published rows as webdataset shards (`recap_tasks.export`, the same
images and captions a training job gets), splits them by a hash of uid into training and held-out
rows, and for each mix ratio p trains a CLIP from scratch in which every sample shows its original
caption with probability p and its recaption otherwise (`CaptionMixer`; the paper's p = 0.8). Each
model is scored by zero-shot retrieval on the held-out rows, image->text and text->image Recall@1/5/10,
once against the held-out original captions (`org`) and once against their recaptions (`re`): a
recaption-trained model may retrieve recaptions well and alt text badly, or the reverse.

The model is transformers' `CLIPModel` from a small random `CLIPConfig` trained with its own
contrastive loss (open_clip would pull another torch and torchvision); the tokenizer is word-level,
learned from the training rows' captions (both kinds, so every p shares one vocabulary). At the
default size this runs on a CPU in minutes and shows trends on a small lake only; the paper's
scale is a GPU job (`evaluate.device: cuda`, a bigger `evaluate` section).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import io
import logging
import math
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from recap_tasks.config import EvaluateConfig
from recap_tasks.errors import RecapError
from recap_tasks.export import CaptionMixer, export_webdataset
from recap_tasks.lake import RECAP, Lake
from recap_tasks.runs import check_name, new_run_id, progress, utcnow

log = logging.getLogger(__name__)

EVALUATIONS = "_reports/evaluations"
# Held-out text sets: webdataset field -> what it holds.
TEXT_SETS = {"org": "org.txt", "re": "re.txt"}
RECALL_AT = (1, 5, 10)
_IMAGE_EXTS = ("jpg", "png", "webp", "gif")
_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
# CLIP's image normalisation (OpenAI), as transformers' CLIPImageProcessor applies it.
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


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
    torch = _torch()
    device = _device(torch, config.device)
    started, t0 = utcnow(), time.perf_counter()

    published = _published_rows(lake)
    with tempfile.TemporaryDirectory(prefix="recap-evaluate-") as tmp:
        manifest = export_webdataset(lake, tmp, p_original=config.p_values[0])
        samples = read_webdataset(tmp, manifest["shards"])
    export_s = time.perf_counter() - t0

    train_uids, heldout_uids = heldout_split([s["__key__"] for s in samples], fraction=config.heldout_fraction,
                                             min_rows=config.min_heldout_rows)
    if len(train_uids) < config.min_train_rows:
        raise RecapError(
            f"evaluate clip: {len(samples)} exported rows of {lake.uri} are too few: a held-out split of "
            f"{len(heldout_uids)} (evaluate.heldout_fraction={config.heldout_fraction}, "
            f"evaluate.min_heldout_rows={config.min_heldout_rows}) leaves {len(train_uids)} to train on, fewer "
            f"than evaluate.min_train_rows={config.min_train_rows}: publish more rows or lower those settings")
    by_uid = {s["__key__"]: s for s in samples}
    train = [by_uid[u] for u in train_uids]
    heldout = [by_uid[u] for u in heldout_uids]

    t1 = time.perf_counter()
    tokenizer = build_tokenizer([_text(s, f) for s in train for f in TEXT_SETS.values()], config)
    train_images = _images(train, config.image_size, torch)
    heldout_images = _images(heldout, config.image_size, torch)
    heldout_texts = {name: _tokenize(tokenizer, [_text(s, field) for s in heldout], torch)
                     for name, field in TEXT_SETS.items()}
    prepare_s = time.perf_counter() - t1

    results = []
    for p in config.p_values:
        t2 = time.perf_counter()
        model, losses, original_fraction = _train(train, train_images, tokenizer, p, config, device, torch)
        retrieval = {name: _retrieval(model, heldout_images, texts, device, torch)
                     for name, texts in heldout_texts.items()}
        results.append({
            "p": p, "train_rows": len(train), "heldout_rows": len(heldout), "steps": config.steps,
            "batch_size": min(config.batch_size, len(train)), "first_loss": round(losses[0], 4),
            "final_loss": round(losses[-1], 4), "original_fraction": round(original_fraction, 4),
            "retrieval": retrieval, "seconds": round(time.perf_counter() - t2, 2),
        })
        del model
        log.info("evaluate clip p=%.2f: loss %.3f -> %.3f, org i2t R@1 %.3f, re i2t R@1 %.3f", p, losses[0],
                 losses[-1], retrieval["org"]["i2t"]["r1"], retrieval["re"]["i2t"]["r1"])

    split_file = f"{EVALUATIONS}/clip-{run_id}-split.parquet"
    lake.write_parquet(split_file, pa.table({
        "uid": train_uids + heldout_uids,
        "split": ["train"] * len(train_uids) + ["heldout"] * len(heldout_uids),
    }))
    result = {
        "kind": "clip_retrieval",
        "run_id": run_id,
        "created_at": started.isoformat(),
        "lake": lake.uri,
        "table_version": manifest["table_version"],
        "model": f"transformers CLIPModel, random init, {_parameters(config, len(tokenizer['vocab']))}",
        "tokenizer": {"kind": "word-level, lowercased, learned from the training rows' original captions and "
                              "recaptions", "vocab_size": len(tokenizer["vocab"])},
        "device": device,
        "rows": {"published": published, "exported": len(samples), "train": len(train),
                 "heldout": len(heldout)},
        "split_file": split_file,
        "text_sets": {"org": "held-out original captions", "re": "held-out recaptions"},
        # Recall of a model that ranks at random, to read the figures against.
        "chance": {f"r{k}": round(min(1.0, k / len(heldout)), 4) for k in RECALL_AT},
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


def _text(sample: dict, field: str) -> str:
    return (sample.get(field) or b"").decode("utf-8", "replace")


def build_tokenizer(texts: list[str], config: EvaluateConfig) -> dict:
    """A word-level tokenizer learned from `texts`: {"tokenizer": tokenizers.Tokenizer, "vocab": {...}}."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation(behavior="removed")])
    core.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=config.vocab_size, special_tokens=_SPECIAL))
    vocab = core.get_vocab()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    core.enable_truncation(max_length=config.context_length)
    core.enable_padding(pad_id=vocab["<pad>"], pad_token="<pad>")
    return {"tokenizer": core, "vocab": vocab}


def _tokenize(tokenizer: dict, texts: list[str], torch) -> dict:
    encoded = tokenizer["tokenizer"].encode_batch(texts)
    ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}


def _images(samples: list[dict], size: int, torch):
    """uint8 [n, 3, size, size]: each image resized on its short side and centre-cropped, as CLIP does."""
    import numpy as np
    from PIL import Image, ImageOps

    out = np.empty((len(samples), 3, size, size), dtype=np.uint8)
    for i, sample in enumerate(samples):
        data = next(sample[ext] for ext in _IMAGE_EXTS if ext in sample)
        with Image.open(io.BytesIO(data)) as im:
            fitted = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(fitted).transpose(2, 0, 1)
    return torch.from_numpy(out)


def _pixels(images, device: str, torch):
    mean = torch.tensor(_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=device).view(1, 3, 1, 1)
    return (images.to(device).float() / 255 - mean) / std


def _model(config: EvaluateConfig, vocab: dict, torch):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    clip = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(vocab), hidden_size=config.width, intermediate_size=4 * config.width,
                                   num_hidden_layers=config.layers, num_attention_heads=config.heads,
                                   max_position_embeddings=config.context_length, pad_token_id=vocab["<pad>"],
                                   bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"]),
        vision_config=CLIPVisionConfig(hidden_size=config.width, intermediate_size=4 * config.width,
                                       num_hidden_layers=config.layers, num_attention_heads=config.heads,
                                       image_size=config.image_size, patch_size=config.patch_size),
        projection_dim=config.embed_dim,
    )
    torch.manual_seed(config.seed)
    return CLIPModel(clip)


def _parameters(config: EvaluateConfig, vocab_size: int) -> str:
    return (f"width {config.width}, {config.layers} layers, {config.heads} heads, embed {config.embed_dim}, "
            f"image {config.image_size}px / patch {config.patch_size}, context {config.context_length}, "
            f"vocab {vocab_size}")


def _train(train: list[dict], images, tokenizer: dict, p: float, config: EvaluateConfig, device: str, torch):
    """(model, loss per step, share of samples shown their original caption)."""
    model = _model(config, tokenizer["vocab"], torch).to(device).train()
    # No weight decay on biases, norms and the temperature (as OpenCLIP).
    decay = [w for n, w in model.named_parameters() if w.ndim >= 2 and "logit_scale" not in n]
    rest = [w for n, w in model.named_parameters() if not (w.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config.steps))
    mixer = CaptionMixer(p_original=p, seed=config.seed)
    order_rng = torch.Generator().manual_seed(config.seed)  # the same batches for every p
    batch_size = min(config.batch_size, len(train))
    order: list[int] = []
    losses, shown_original = [], 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    bar = progress(desc=f"clip p={p:g}", total=config.steps, unit="step")
    for _ in range(config.steps):
        if len(order) < batch_size:  # a new epoch; no sample twice in one batch
            order = torch.randperm(len(train), generator=order_rng).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        texts = [mixer(dict(train[i]))["txt"] for i in idx]
        shown_original += sum(t == _text(train[i], "org.txt") for t, i in zip(texts, idx))
        tokens = {k: v.to(device) for k, v in _tokenize(tokenizer, texts, torch).items()}
        with autocast:
            loss = model(**tokens, pixel_values=_pixels(images[idx], device, torch), return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    if not all(math.isfinite(v) for v in losses):
        raise RecapError(f"evaluate clip p={p}: the training loss diverged (non-finite); lower "
                         f"evaluate.learning_rate ({config.learning_rate})")
    return model.eval(), losses, shown_original / (config.steps * batch_size)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to zero."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _retrieval(model, images, texts: dict, device: str, torch, chunk: int = 256) -> dict:
    """Recall@K both ways: image i's own text among its top K texts, and text i's image among its top K."""
    with torch.inference_mode():
        img = torch.cat([model.get_image_features(pixel_values=_pixels(images[s:s + chunk], device, torch))
                         .pooler_output.float() for s in range(0, len(images), chunk)])
        txt = torch.cat([model.get_text_features(input_ids=texts["input_ids"][s:s + chunk].to(device),
                                                 attention_mask=texts["attention_mask"][s:s + chunk].to(device))
                         .pooler_output.float() for s in range(0, len(texts["input_ids"]), chunk)])
        sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
        own = sim.diag()
        # Rank = how many candidates score strictly higher than the true pair (0 = top).
        ranks = {"i2t": (sim > own[:, None]).sum(1), "t2i": (sim > own[None, :]).sum(0)}
        return {d: {f"r{k}": round(float((r < k).float().mean()), 4) for k in RECALL_AT} for d, r in ranks.items()}


def _torch():
    try:
        import torch
    except ImportError:
        raise RecapError("evaluate clip needs torch and transformers: install recap[cpu] or recap[gpu]") from None
    return torch


def _device(torch, wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise RecapError(f"evaluate.device={wanted} but no CUDA GPU is visible; use cpu or auto")
    return wanted
