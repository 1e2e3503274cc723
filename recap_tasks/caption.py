"""Caption stage: kept pairs without a caption -> `captions`, one shard (work unit) at a time."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import lake as tables
from recap_tasks.captioning import Captioner
from recap_tasks.config import CaptionConfig, RecapConfig
from recap_tasks.images import open_rgb, read_images
from recap_tasks.lake import Lake, not_in
from recap_tasks.runs import new_run_id, progress, utcnow

log = logging.getLogger(__name__)

_POINTER = ["uid", "key", "shard_id", "source_uri", "source_format", "image_offset", "image_size",
            "source_row", "image_column"]


@dataclass
class CaptionResult:
    run_id: str
    pending: int = 0
    captioned: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"run_id": self.run_id, "pending": self.pending, "captioned": self.captioned,
                "rejected": self.rejected, "shards": len(self.shards)}


def pending_pairs(lake: Lake, shard_ids: list[str] | None = None) -> pa.Table:
    """Pairs the filter kept that have no caption and no rejection yet."""
    verdicts = lake.read(tables.FILTER_RESULTS, ["uid", "kept"])
    kept = verdicts.filter(verdicts.column("kept")).column("uid")
    pairs = lake.read(tables.PAIRS, _POINTER)
    pairs = pairs.filter(pc.is_in(pairs.column("uid"), value_set=kept.combine_chunks()))
    pairs = pairs.filter(not_in(pairs.column("uid"), lake.uids(tables.CAPTIONS)))
    rejected = lake.read(tables.REJECTED, ["uid", "stage"])
    caption_rejects = rejected.filter(pc.equal(rejected.column("stage"), "caption")).column("uid")
    pairs = pairs.filter(not_in(pairs.column("uid"), caption_rejects.combine_chunks()))
    if shard_ids is not None:
        pairs = pairs.filter(pc.is_in(pairs.column("shard_id"), value_set=pa.array(shard_ids, pa.string())))
    return pairs


def run_caption(lake: Lake, *, model: str | None = None, captioner: Captioner | None = None,
                config: CaptionConfig | None = None, run_id: str | None = None,
                shard_ids: list[str] | None = None) -> CaptionResult:
    """Caption every pending pair (or those of `shard_ids`); each finished shard is committed."""
    config = config or RecapConfig.load().caption
    run_id = run_id or new_run_id()
    pending = pending_pairs(lake, shard_ids)
    result = CaptionResult(run_id, pending=pending.num_rows)
    if pending.num_rows == 0:
        log.info("caption %s: nothing to caption", run_id)
        return result
    if captioner is None:
        if model is None:
            raise ValueError("run_caption needs a model id/path or a captioner")
        from recap_tasks.captioning.transformers_backend import TransformersCaptioner

        captioner = TransformersCaptioner(model, config)
    prov = captioner.provenance()
    shard_col = pending.column("shard_id")
    bar = progress(desc="caption", total=pending.num_rows, unit="img")
    for shard_id in sorted(set(shard_col.to_pylist())):
        rows = pending.filter(pc.equal(shard_col, shard_id))
        captions, rejects = [], []
        for start in range(0, rows.num_rows, config.batch_size):
            batch = rows.slice(start, config.batch_size)
            images, ok = _load(batch, rejects, run_id, lake)
            texts = captioner.caption(images) if images else []
            now = utcnow()
            for i, text in zip(ok, texts):
                captions.append({"uid": batch.column("uid")[i].as_py(), "shard_id": shard_id, "re_caption": text,
                                 "model": prov["model"], "prompt": prov["prompt"], "generation": prov["generation"],
                                 "run_id": run_id, "captioned_at": now})
            bar.update(batch.num_rows)
        lake.insert_new(tables.REJECTED, pa.Table.from_pylist(rejects, schema=tables.schemas.REJECTED.arrow),
                        keys=("uid", "stage"))
        result.captioned += lake.insert_new(
            tables.CAPTIONS, pa.Table.from_pylist(captions, schema=tables.schemas.CAPTIONS.arrow))
        for r in rejects:
            result.rejected[r["reason"]] = result.rejected.get(r["reason"], 0) + 1
        result.shards.append(shard_id)
    bar.close()
    log.info("caption %s: %s", run_id, result.summary())
    return result


def _load(batch: pa.Table, rejects: list[dict], run_id: str, lake: Lake | None = None):
    """Decode a batch's images; a source that vanished or changed is a caption-stage rejection."""
    images, ok = [], []
    try:
        blobs = read_images(batch, lake=lake)  # face-blurred copies where the filter made them
    except OSError as exc:
        blobs = [None] * batch.num_rows
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = "image bytes could not be read back from the source shard"
    for i, blob in enumerate(blobs):
        try:
            if blob is None:
                raise OSError(error)
            images.append(open_rgb(blob))
            ok.append(i)
        except Exception as exc:  # a shard rewritten since ingest can hold anything at the pointer
            rejects.append({"uid": batch.column("uid")[i].as_py(), "key": batch.column("key")[i].as_py(),
                            "shard_id": batch.column("shard_id")[i].as_py(), "stage": "caption",
                            "reason": "image_unavailable", "detail": str(exc)[:1000], "run_id": run_id,
                            "rejected_at": utcnow()})
    return images, ok
