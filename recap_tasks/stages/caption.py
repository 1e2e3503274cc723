"""Caption stage: kept pairs without a caption -> `captions`, shard by shard, committed in parts.

Images are read and preprocessed in background threads a few batches ahead of generation. A CUDA
out-of-memory error halves the batch and retries instead of failing. Captions are committed every
`commit_every` rows, so a killed run resumes from its last part: pending rows are always "kept and
not yet captioned", and a finished shard has none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import lake as tables
from recap_tasks import progress
from recap_tasks.captioning import Captioner, load_captioner
from recap_tasks.config import CaptionConfig, RecapConfig
from recap_tasks.errors import RecapError
from recap_tasks.hygiene import clean_caption, distinct_ngram_ratio, echoes_prompt, is_refusal
from recap_tasks.images import open_rgb, read_images
from recap_tasks.lake import Lake, not_in
from recap_tasks.runs import new_run_id, progress_bar, utcnow

log = logging.getLogger(__name__)

_POINTER = ["uid", "key", "org_caption", "sha256", "shard_id", "source_uri", "source_format", "image_offset",
            "image_size", "source_row", "image_column", "width", "height"]


@dataclass
class CaptionResult:
    run_id: str
    pending: int = 0
    captioned: int = 0
    parts: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    oom_splits: int = 0

    def summary(self) -> dict:
        return {"run_id": self.run_id, "pending": self.pending, "captioned": self.captioned, "parts": self.parts,
                "rejected": self.rejected, "shards": len(self.shards), "oom_splits": self.oom_splits}


def pending_pairs(lake: Lake, shard_ids: list[str] | None = None) -> pa.Table:
    """Pairs the filter kept that have no caption and no rejection yet, in `shard_ids` (default:
    the shards the progress records show pending). Reads only those shards' partitions."""
    if shard_ids is None:
        shard_ids = progress.pending_shards(lake, "caption")
    verdicts = lake.read(tables.FILTER_RESULTS, ["uid", "kept"], shards=shard_ids)
    kept = verdicts.filter(pc.fill_null(verdicts.column("kept"), False)).column("uid")
    pairs = lake.read(tables.PAIRS, _POINTER, shards=shard_ids)
    pairs = pairs.filter(pc.is_in(pairs.column("uid"), value_set=kept.combine_chunks()))
    pairs = pairs.filter(not_in(pairs.column("uid"), lake.uids(tables.CAPTIONS, shards=shard_ids)))
    rejected = lake.read(tables.REJECTED, ["uid", "stage"], shards=shard_ids)
    caption_rejects = rejected.filter(pc.equal(rejected.column("stage"), "caption")).column("uid")
    pairs = pairs.filter(not_in(pairs.column("uid"), caption_rejects.combine_chunks()))
    return pairs.sort_by([("shard_id", "ascending"), ("uid", "ascending")])


@dataclass
class _Batch:
    rows: pa.Table
    images: list  # PIL images of the rows that decoded
    ok: list[int]  # their row indices
    rejects: list[dict]
    prepared: object | None = None


def run_caption(lake: Lake, *, model: str | None = None, captioner: Captioner | None = None,
                config: CaptionConfig | None = None, run_id: str | None = None,
                shard_ids: list[str] | None = None) -> CaptionResult:
    """Caption every pending pair (or those of `shard_ids`), committing every `commit_every` rows."""
    config = config or RecapConfig.load().caption
    run_id = run_id or new_run_id()
    if shard_ids is not None:
        progress.require_known(lake, shard_ids)
    if captioner is None and model is not None:
        from recap_tasks.preflight import check_model

        check_model(model)  # a missing model folder fails even when nothing is pending
    targets = sorted(set(shard_ids)) if shard_ids is not None else progress.pending_shards(lake, "caption")
    pending = pending_pairs(lake, targets)
    result = CaptionResult(run_id, pending=pending.num_rows)
    if pending.num_rows == 0:
        # Captions may have been committed by a run that died before recording them.
        progress.record(lake, "caption", targets, run_id=run_id)
        log.info("caption %s: nothing to caption", run_id)
        return result
    if captioner is not None:
        return _caption(lake, captioner, config, run_id, targets, pending, result)
    if model is None:
        raise ValueError("run_caption needs a model id/path or a captioner")
    with load_captioner(model, config) as owned:  # a vLLM engine process ends with the stage
        return _caption(lake, owned, config, run_id, targets, pending, result)


def _caption(lake: Lake, captioner: Captioner, config: CaptionConfig, run_id: str, targets: list[str],
             pending: pa.Table, result: CaptionResult) -> CaptionResult:
    scorer = None
    if config.clip_model:
        from recap_tasks.captioning.clip_scorer import ClipScorer

        scorer = ClipScorer(config.clip_model, device=config.device)
    prov = captioner.provenance()
    batch_size = captioner.batch_size or config.batch_size
    backoff = _Backoff(captioner, batch_size)
    bar = progress_bar(desc="caption", total=pending.num_rows, unit="img")
    with ThreadPoolExecutor(max_workers=config.decode_workers, thread_name_prefix="recap-decode") as pool:
        for shard_id in sorted(set(pending.column("shard_id").to_pylist())):
            rows = _by_expected_length(pending.filter(pc.equal(pending.column("shard_id"), shard_id)))
            part: list[dict] = []
            rejects: list[dict] = []
            for batch in _prefetch(pool, rows, lake, captioner, batch_size, config.prefetch_batches, run_id):
                rejects += batch.rejects
                texts = backoff.caption(batch.images, batch.prepared) if batch.images else []
                part += _rows(batch, texts, scorer, prov, config, shard_id, run_id)
                bar.update(batch.rows.num_rows)
                if len(part) >= config.commit_every:
                    result.captioned += _commit(lake, part, rejects, result)
                    part, rejects = [], []
            result.captioned += _commit(lake, part, rejects, result)
            progress.record(lake, "caption", [shard_id], run_id=run_id)
            result.shards.append(shard_id)
    bar.close()
    # Shards that had nothing left to caption (finished by a run that died before recording).
    progress.record(lake, "caption", [s for s in targets if s not in set(result.shards)], run_id=run_id)
    result.oom_splits = backoff.splits
    log.info("caption %s: %s", run_id, result.summary())
    return result


def _by_expected_length(rows: pa.Table) -> pa.Table:
    """A shard's rows ordered so that batch mates are alike: static batches wait for their longest
    caption and pad to their longest prompt.

    Nothing predicts a caption's length before generation; the image's compressed bytes per pixel
    (visual detail) is a free proxy from the pairs table. Images are first grouped by size (factors
    of two in pixels), which resolution-dependent models (LLaVA-NeXT's AnyRes, Qwen-VL) turn into
    prompt lengths. Captions do not depend on the order (greedy, left padding), only which rows
    share a commit does.
    """
    if rows.num_rows < 2 or "width" not in rows.column_names:
        return rows
    pixels = pc.cast(pc.max_element_wise(pc.multiply(pc.cast(pc.fill_null(rows.column("width"), 1), pa.float64()),
                                                     pc.cast(pc.fill_null(rows.column("height"), 1), pa.float64())),
                                         1.0), pa.float64())
    size_class = pc.round(pc.log2(pixels))
    detail = pc.divide(pc.cast(pc.fill_null(rows.column("image_size"), 0), pa.float64()), pixels)
    keyed = rows.append_column("_size", size_class).append_column("_detail", detail)
    order = pc.sort_indices(keyed, [("_size", "ascending"), ("_detail", "ascending"), ("uid", "ascending")])
    return rows.take(order)


def _prefetch(pool: ThreadPoolExecutor, rows: pa.Table, lake: Lake, captioner: Captioner, batch_size: int,
              prefetch_batches: int, run_id: str) -> Iterator[_Batch]:
    """Batches in order, each read, decoded and prepared in the pool, up to `prefetch_batches` ahead."""
    starts = list(range(0, rows.num_rows, batch_size))
    futures = []
    for start in starts:
        futures.append(pool.submit(_load, rows.slice(start, batch_size), lake, captioner, run_id))
        if len(futures) > prefetch_batches:
            yield futures.pop(0).result()
    for f in futures:
        yield f.result()


def _load(rows: pa.Table, lake: Lake, captioner: Captioner, run_id: str) -> _Batch:
    """Decode a batch's images; a source that vanished or changed is a caption-stage rejection."""
    batch = _Batch(rows, [], [], [])
    problems: dict[int, tuple[str, str]] = {}
    try:
        blobs = read_images(rows, lake, problems=problems)
        error = "image bytes could not be read back from the source shard"
    except OSError as exc:
        blobs = [None] * rows.num_rows
        error = f"{type(exc).__name__}: {exc}"
    for i, blob in enumerate(blobs):
        reason = "image_unavailable"
        try:
            if i in problems:
                reason, detail = problems[i]
                raise OSError(detail)
            if blob is None:
                raise OSError(error)
            batch.images.append(open_rgb(blob))
            batch.ok.append(i)
        except Exception as exc:  # a shard rewritten since ingest can hold anything at the pointer
            batch.rejects.append({"uid": rows.column("uid")[i].as_py(), "key": rows.column("key")[i].as_py(),
                                  "shard_id": rows.column("shard_id")[i].as_py(), "stage": "caption",
                                  "reason": reason, "detail": str(exc)[:1000], "run_id": run_id,
                                  "rejected_at": utcnow()})
    if batch.images:
        batch.prepared = captioner.prepare(batch.images)
    return batch


class _Backoff:
    """Generate with the largest batch that fits: halve and retry on CUDA out-of-memory."""

    def __init__(self, captioner: Captioner, batch_size: int):
        self.captioner = captioner
        self.limit = batch_size
        self.splits = 0

    def caption(self, images: list, prepared=None) -> list[str]:
        if len(images) > self.limit:
            size = self.limit  # fixed for this split, even if a chunk lowers the limit further
            return [t for i in range(0, len(images), size) for t in self.caption(images[i:i + size])]
        try:
            return self.captioner.generate(prepared if prepared is not None else self.captioner.prepare(images))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self.captioner.free_memory()
            if len(images) == 1:
                raise RecapError("out of memory captioning a single image: use a smaller model, a lower "
                                 "precision (caption.dtype) or a larger accelerator") from exc
            self.limit = max(1, len(images) // 2)
            self.splits += 1
            log.warning("out of memory at batch %d; retrying with batches of %d", len(images), self.limit)
            return self.caption(images)


def is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _rows(batch: _Batch, texts: list[str], scorer, prov: dict, config: CaptionConfig, shard_id: str,
          run_id: str) -> list[dict]:
    cleaned = [clean_caption(t, config.prompt) for t in texts]
    org = [batch.rows.column("org_caption")[i].as_py() for i in batch.ok]
    if scorer is not None and cleaned:
        re_scores, org_scores, truncated = scorer.score_pairs(batch.images, org, cleaned)
    else:
        re_scores = org_scores = np.full(len(cleaned), np.nan)
        truncated = [None] * len(cleaned)
    now = utcnow()
    out = []
    for j, (i, raw, text) in enumerate(zip(batch.ok, texts, cleaned)):
        out.append({
            "uid": batch.rows.column("uid")[i].as_py(), "shard_id": shard_id, "re_caption": text,
            "model": prov["model"], "prompt": prov["prompt"], "generation": prov["generation"],
            "is_refusal": is_refusal(text), "prompt_echo": echoes_prompt(raw, config.prompt),
            "distinct_ngram_ratio": distinct_ngram_ratio(text),
            "re_clip_score": None if np.isnan(re_scores[j]) else float(re_scores[j]),
            "org_clip_score": None if np.isnan(org_scores[j]) else float(org_scores[j]),
            "clip_model": scorer.model_id if scorer is not None else None,
            "re_clip_truncated": None if truncated[j] is None else bool(truncated[j]),
            "run_id": run_id, "captioned_at": now,
        })
    return out


def _commit(lake: Lake, part: list[dict], rejects: list[dict], result: CaptionResult) -> int:
    """One part: rejections, then captions (insert-if-absent by uid, so a replayed part adds nothing)."""
    if rejects:
        lake.insert_new(tables.REJECTED, pa.Table.from_pylist(rejects, schema=tables.schemas.REJECTED.arrow),
                        keys=("uid", "stage"))
        for r in rejects:
            result.rejected[r["reason"]] = result.rejected.get(r["reason"], 0) + 1
    if not part:
        return 0
    result.parts += 1
    return lake.insert_new(tables.CAPTIONS, pa.Table.from_pylist(part, schema=tables.schemas.CAPTIONS.arrow))
