"""Ingest: source shards -> the `pairs` table (one row per good sample) and `rejected`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from recap_tasks import lake as tables
from recap_tasks import progress, storage
from recap_tasks.config import IngestConfig, RecapConfig
from recap_tasks.errors import RecapError
from recap_tasks.ids import make_uid, shard_id_for
from recap_tasks.images import ImageInfo, ImageRejected, inspect_image
from recap_tasks.lake import Lake, sql_list
from recap_tasks.readers import RawSample, ShardReport, expand_sources
from recap_tasks.readers.parquet import ParquetReader
from recap_tasks.readers.webdataset import WebDatasetReader
from recap_tasks.runs import new_run_id, progress_bar, utcnow
from recap_tasks.shards import ingest_records, is_ingested

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    shard_id: str
    source_uri: str
    rows: int = 0
    rejected: int = 0
    truncated: bool = False
    detail: str | None = None
    skipped: bool = False  # already ingested by an earlier run
    reasons: dict[str, int] = field(default_factory=dict)
    download_failed: int = 0  # rows of the shard's download record that never became a sample
    # Metadata set aside on rows that were kept (face_bboxes malformed...): {reason: rows}.
    metadata_ignored: dict[str, int] = field(default_factory=dict)


@dataclass
class IngestResult:
    run_id: str
    shards: list[ShardResult]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def rejected(self) -> int:
        return sum(s.rejected for s in self.shards)

    def summary(self) -> dict:
        return {
            "run_id": self.run_id,
            "shards": len(self.shards),
            "shards_skipped": sum(s.skipped for s in self.shards),
            "shards_truncated": [s.shard_id for s in self.shards if s.truncated],
            "rows": self.rows,
            "rejected": self.rejected,
            "download_failed": sum(s.download_failed for s in self.shards),
            "metadata_ignored": dict(sum((Counter(s.metadata_ignored) for s in self.shards), Counter())),
        }


def ingest(sources: list[str], lake: Lake, *, config: IngestConfig | None = None, run_id: str | None = None,
           force: bool = False) -> IngestResult:
    """Ingest every shard under `sources`; shards already ingested unchanged are skipped."""
    config = config or RecapConfig.load().ingest
    run_id = run_id or new_run_id()
    shards = expand_sources(sources)
    _check_unique_shard_ids(shards, config.dataset)
    # One read of the small progress table for the whole call, not one per shard.
    done = ingest_records(lake, shards, config.dataset)
    results = []
    for path in progress_bar(shards, desc="ingest", unit="shard"):
        previous = done.get(shard_id_for(path, config.dataset))
        results.append(ingest_shard(path, lake, config=config, run_id=run_id, force=force, previous=previous))
    out = IngestResult(run_id, results)
    log.info("ingest %s: %s", run_id, out.summary())
    return out


def ingest_shard(path: str | os.PathLike[str], lake: Lake, *, config: IngestConfig, run_id: str,
                 force: bool = False, previous: dict | None = None) -> ShardResult:
    """One work unit: read a shard, check each sample, write pairs and rejections, mark it done.

    `previous` is the shard's latest ingest progress record, if any (shards.ingest_records).
    """
    path = storage.normalize(path)  # a local path or an s3:// URI, as `source_uri` records it
    shard_id = shard_id_for(path, config.dataset)
    size, mtime_ns = storage.stat(path)
    _check_same_source(shard_id, path, previous)
    if previous and not force:
        if is_ingested(previous, path, (size, mtime_ns)):
            return ShardResult(shard_id, path, skipped=True, rows=0, rejected=0,
                               truncated=previous.get("truncated", False), detail=previous.get("detail"))
        log.warning("shard %s changed since run %s; ingesting samples not seen before", shard_id, previous["run_id"])

    shard_rows = _ShardRows(path, shard_id, config, run_id, utcnow())
    report = shard_rows.read()
    if report.truncated:
        log.warning("shard %s is truncated: %s", shard_id, report.detail)
    result = ShardResult(shard_id, path, truncated=report.truncated, detail=report.detail,
                         reasons=shard_rows.reasons, metadata_ignored=shard_rows.metadata_ignored)
    result.rows = lake.insert_new(tables.PAIRS,
                                  pa.Table.from_pylist(shard_rows.good, schema=tables.schemas.PAIRS.arrow))
    if previous and shard_rows.good:
        _drop_healed_rejections(lake, shard_id, shard_rows.good)
    result.rejected = lake.insert_new(tables.REJECTED,
                                      pa.Table.from_pylist(shard_rows.bad, schema=tables.schemas.REJECTED.arrow))
    if path.endswith(".tar"):
        result.download_failed = _record_download_failures(lake, path, shard_id, run_id, shard_rows.now,
                                                           rewritten=bool(previous))
    # Recorded last: a shard is done only once both tables hold its rows.
    progress.record(lake, "ingest", [shard_id], run_id=run_id, sources={shard_id: {
        "source_uri": path, "size": size, "mtime_ns": mtime_ns,
        "truncated": report.truncated, "detail": report.detail}})
    return result


@dataclass
class _ShardRows:
    """One shard's samples, read and checked: pair rows (`good`), rejection rows (`bad`), and the
    count of each rejection reason."""

    path: str
    shard_id: str
    config: IngestConfig
    run_id: str
    now: datetime
    good: list[dict] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    metadata_ignored: dict[str, int] = field(default_factory=dict)

    def read(self) -> ShardReport:
        """Read the shard, sorting each sample into `good` or `bad`; the reader's report on the shard."""
        reader, source_format = _reader(self.path, self.config)
        try:
            for sample in reader.read(self.path):
                verdict = _Rejection(sample.error, sample.detail) if sample.error else _check(sample, self.config)
                if isinstance(verdict, _Rejection):
                    self._reject(sample, verdict.reason, verdict.detail)
                else:
                    self.good.append(self._pair(sample, verdict, source_format, getattr(reader, "image_column", None)))
        except (tarfile.TarError, EOFError, OSError, pa.ArrowException) as exc:
            # The shard cannot be opened (not a tar, corrupt parquet footer): samples read before
            # the failure are kept, the failure itself is one rejection row for the shard.
            log.error("shard %s unreadable: %s", self.shard_id, exc)
            self.bad.append({"uid": make_uid(self.shard_id, "#shard"), "key": None, "shard_id": self.shard_id,
                             "stage": "ingest", "reason": "shard_unreadable",
                             "detail": f"{type(exc).__name__}: {exc}"[:1000], "run_id": self.run_id,
                             "rejected_at": self.now})
            self.reasons["shard_unreadable"] = 1
        return reader.report

    def _reject(self, sample: RawSample, reason: str, detail: str | None) -> None:
        self.bad.append({"uid": make_uid(self.shard_id, sample.key, sample.occurrence),
                         "key": _printable(sample.key[:1024]), "shard_id": self.shard_id, "stage": "ingest",
                         "reason": reason, "detail": _printable((detail or "")[:1000]), "run_id": self.run_id,
                         "rejected_at": self.now})
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def _pair(self, sample: RawSample, accepted: _Accepted, source_format: str, image_column: str | None) -> dict:
        info = accepted.info
        face_bboxes, ignored = _face_bboxes(sample.meta, info)
        if ignored:
            self._ignore(sample, ignored)
        clip_score, clip_model = _source_clip(sample.meta)
        return {
            "uid": make_uid(self.shard_id, sample.key, sample.occurrence), "key": sample.key, "url": sample.url,
            "org_caption": accepted.caption, "sha256": accepted.sha256, "source_uid": _source_uid(sample.meta),
            "references": _references(sample.meta), "face_bboxes": face_bboxes,
            "source_clip_score": clip_score, "source_clip_model": clip_model,
            "width": info.width, "height": info.height,
            "image_format": info.format, "source_uri": str(self.path), "source_format": source_format,
            "image_offset": sample.image_offset, "image_size": sample.image_size,
            "source_row": sample.source_row,
            "image_column": image_column, "shard_id": self.shard_id,
            "run_id": self.run_id, "ingested_at": self.now,
        }

    def _ignore(self, sample: RawSample, reason: str) -> None:
        """Count metadata set aside on a kept row; the first of each reason per shard is logged."""
        if reason not in self.metadata_ignored:
            log.warning("shard %s: sample %r: %s (the row is kept without it; further ones are counted in the "
                        "ingest summary's metadata_ignored)", self.shard_id, _printable(sample.key[:200]), reason)
        self.metadata_ignored[reason] = self.metadata_ignored.get(reason, 0) + 1


def _reader(path: str, config: IngestConfig) -> tuple[WebDatasetReader | ParquetReader, str]:
    """The reader for a shard's format, and the format's name (`source_format`)."""
    if path.endswith(".tar"):
        return WebDatasetReader(max_image_bytes=config.max_image_bytes,
                                max_caption_bytes=config.max_caption_bytes), "wds"
    return ParquetReader(image_column=config.image_column, caption_column=config.caption_column,
                         key_column=config.key_column, url_column=config.url_column,
                         max_image_bytes=config.max_image_bytes), "parquet"


def _drop_healed_rejections(lake: Lake, shard_id: str, good: list[dict]) -> None:
    """A shard re-read after it grew (img2dataset was still writing it): samples that were cut off
    before are whole now; their old ingest rejections go, so each row is in one place."""
    earlier = lake.read(tables.REJECTED, ["uid", "stage"], shards=[shard_id]).to_pylist()
    whole = {r["uid"] for r in good} & {r["uid"] for r in earlier if r["stage"] == "ingest"}
    if whole:
        lake.delete(tables.REJECTED, [shard_id], f"stage = 'ingest' AND uid IN ({sql_list(sorted(whole))})")
        log.info("shard %s: %d samples cut off before are whole now", shard_id, len(whole))


def _record_download_failures(lake: Lake, path: str, shard_id: str, run_id: str, now: datetime, *,
                              rewritten: bool) -> int:
    """Write a tar's download failures (the parquet beside it) as rejections and record the shard's
    download stage; how many failed (0 when the tar has no download record)."""
    failed = _download_failures(path, shard_id, run_id, now)
    if failed is None:
        return 0
    if rewritten:
        # The shard was rewritten (`recap download --retry-failed`): its download verdicts now are
        # the ones in its parquet; a retried sample that succeeded is a pair, not a rejection.
        lake.delete(tables.REJECTED, [shard_id], "stage = 'download'")
    lake.insert_new(tables.REJECTED, pa.Table.from_pylist(failed, schema=tables.schemas.REJECTED.arrow))
    progress.record(lake, "download", [shard_id], run_id=run_id)
    return len(failed)


def _download_failures(path: str, shard_id: str, run_id: str, now) -> list[dict] | None:
    """The metadata rows a downloader could not turn into samples, from the parquet beside the tar.

    recap download and img2dataset both write `<shard>.parquet` with one row per metadata row and
    its `status`; failures become `rejected` rows of stage `download` (uid from the key, as the
    sample would have had). None when the tar has no download record.
    """
    beside = path.removesuffix(".tar") + ".parquet"
    try:
        pf = pq.ParquetFile(storage.open_input(beside))
        names = pf.schema_arrow.names
        if "status" not in names or "key" not in names:
            return None
        wanted = [c for c in ("key", "status", "reason", "error_message") if c in names]
        rows = pf.read(columns=wanted).to_pylist()
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError) as exc:
        log.warning("shard %s: download record %s unreadable (%s); its failures are not counted", shard_id, beside, exc)
        return None
    stats = path.removesuffix(".tar") + "_stats.json"
    if not storage.exists(stats):
        log.info("shard %s: no %s beside it (img2dataset still writing, or an older layout)", shard_id, stats)
    out = []
    for r in rows:
        if r["status"] == "success" or r["key"] is None:
            continue
        key = str(r["key"])
        out.append({"uid": make_uid(shard_id, key), "key": _printable(key[:1024]), "shard_id": shard_id,
                    "stage": "download",
                    "reason": r.get("reason") or download_reason(r["status"], r.get("error_message")),
                    "detail": _printable((r.get("error_message") or r["status"] or "")[:1000]), "run_id": run_id,
                    "rejected_at": now})
    return out


def download_reason(status: str | None, message: str | None) -> str:
    """A snake_case reason for an img2dataset failure, from its status and error message."""
    text = (message or "").lower()
    http = re.search(r"http error (\d{3})", text)
    if http:
        return f"http_{http.group(1)}"
    for needle, reason in (("timed out", "timeout"), ("timeout", "timeout"), ("x-robots-tag", "opted_out"),
                           ("hash", "sha256_mismatch"), ("name or service not known", "dns_error"),
                           ("getaddrinfo", "dns_error"), ("ssl", "tls_error"), ("connection", "connection_error")):
        if needle in text:
            return reason
    return "image_decode_error" if status == "failed_to_resize" else "download_failed"


def _source_uid(meta: dict) -> str | None:
    """The source dataset's own id of a sample: ours (`source_uid`, recap download), DataComp's `uid`
    or LAION's `SAMPLE_ID` (img2dataset's save_additional_columns)."""
    for name in ("source_uid", "uid", "SAMPLE_ID"):
        value = meta.get(name)
        if value is not None and not isinstance(value, (dict, list)):
            return str(value)
    return None


def _references(meta: dict) -> str | None:
    """Human reference captions or object labels in a sample's metadata, as a JSON list of strings:
    COCO-style `captions` (webdataset .json), `references`, or `objects`/`labels`."""
    for name in ("captions", "references", "objects", "labels"):
        value = meta.get(name)
        if isinstance(value, list):
            texts = [v for v in value if isinstance(v, str) and v.strip()]
            if texts:
                return json.dumps(texts, ensure_ascii=False)
    return None


def _face_bboxes(meta: dict, info: ImageInfo) -> tuple[str | None, str | None]:
    """(pairs.face_bboxes, None) for a sample's metadata `face_bboxes` (DataComp: [[x1, y1, x2, y2],
    ...] normalized to the original image), or (None, why they were set aside). Boxes need the
    image's shape: an image resized to another aspect ratio (img2dataset's `border`/`center_crop`
    modes), told by the metadata's original_width/height, cannot use them."""
    raw = meta.get("face_bboxes")
    if raw is None:
        return None, None
    boxes = _normalized_boxes(raw)
    if boxes is None:
        return None, "face_bboxes_malformed"
    if not _same_shape(meta.get("original_width"), meta.get("original_height"), info.width, info.height):
        return None, "face_bboxes_other_aspect"
    return json.dumps(boxes), None


def _normalized_boxes(raw: object) -> list[list[float]] | None:
    """Boxes as [[x1, y1, x2, y2], ...] within [0, 1] (clipped by up to 1%), or None if malformed;
    a JSON string of them is accepted too."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    if not isinstance(raw, (list, tuple)):
        return None
    boxes = []
    for box in raw:
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_finite(v) for v in box):
            return None
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (-0.01 <= x1 <= x2 <= 1.01 and -0.01 <= y1 <= y2 <= 1.01):
            return None
        boxes.append([round(min(1.0, max(0.0, v)), 6) for v in (x1, y1, x2, y2)])
    return boxes


def _same_shape(original_width: object, original_height: object, width: int, height: int) -> bool:
    """Whether an image of width x height keeps the aspect ratio of the original (either way round:
    EXIF-rotated); True when the metadata gives no original size."""
    if not (_finite(original_width) and _finite(original_height) and original_width > 0 and original_height > 0):
        return True
    ratio = original_width / original_height
    slack = 0.01 + 1 / min(width, height)  # rounding of a resize
    return any(abs(w / h - ratio) <= slack * ratio for w, h in ((width, height), (height, width)))


# The CLIP scores a source's metadata may carry, best first, and the model each was made with.
_SOURCE_CLIP_SCORES = (("clip_l14_similarity_score", "ViT-L/14 (DataComp)"),
                       ("clip_b32_similarity_score", "ViT-B/32 (DataComp)"),
                       ("similarity", "ViT-B/32 (LAION)"))


def _source_clip(meta: dict) -> tuple[float | None, str | None]:
    """(score, model) of the CLIP score a sample's metadata carried, or (None, None)."""
    for name, model in _SOURCE_CLIP_SCORES:
        if _finite(meta.get(name)):
            return float(meta[name]), model
    return None, None


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Rejection(NamedTuple):
    reason: str
    detail: str


class _Accepted(NamedTuple):
    caption: str
    info: ImageInfo
    sha256: str


def _printable(text: str) -> str:
    """Text as UTF-8 can store it: lone surrogates (undecodable names, `"\\ud800"` in JSON) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _utf8(text: str | None) -> bool:
    try:
        (text or "").encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check(sample: RawSample, config: IngestConfig) -> _Accepted | _Rejection:
    if not _utf8(sample.key):
        return _Rejection("key_not_utf8", f"sample key {_printable(sample.key)!r} is not valid UTF-8")
    if not _utf8(sample.url):
        return _Rejection("url_not_utf8", f"url {_printable(sample.url or '')[:200]!r} is not valid UTF-8")
    caption = sample.caption
    if caption is None:
        return _Rejection("missing_caption", "sample has no caption")
    if isinstance(caption, bytes):
        if len(caption) > config.max_caption_bytes:
            return _Rejection("caption_too_long", f"caption has more than {config.max_caption_bytes} bytes")
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _Rejection("caption_not_utf8", str(exc))
    elif len(caption.encode("utf-8", "surrogatepass")) > config.max_caption_bytes:
        return _Rejection("caption_too_long", f"caption has more than {config.max_caption_bytes} bytes")
    elif not _utf8(caption):
        return _Rejection("caption_not_utf8", "caption holds a lone surrogate (not valid UTF-8)")
    if "\x00" in caption:
        return _Rejection("caption_not_text", "caption contains NUL characters")
    if sample.image is None and sample.image_size and sample.image_size > config.max_image_bytes:
        return _Rejection("image_too_large", f"image has {sample.image_size} bytes > {config.max_image_bytes}")
    try:
        info = inspect_image(sample.image, max_pixels=config.max_image_pixels)
    except ImageRejected as exc:
        return _Rejection(exc.reason, exc.detail)
    assert sample.image is not None
    # A UTF-8 byte-order mark is an encoding artefact, not part of the caption.
    return _Accepted(caption.lstrip("\ufeff").strip(), info, hashlib.sha256(sample.image).hexdigest())


def _check_unique_shard_ids(shards: list[str], dataset: str | None) -> None:
    seen: dict[str, str] = {}
    for p in shards:
        sid = shard_id_for(p, dataset)
        if sid in seen:
            raise RecapError(f"shards {seen[sid]} and {p} share the shard id {sid!r} (folder/file): ingest them "
                             f"in separate calls with their own --dataset NAME")
        seen[sid] = p


def _check_same_source(shard_id: str, path: str, previous: dict | None) -> None:
    """A shard id already ingested from another file that still exists is another dataset's shard:
    refuse, rather than skip it or mix two datasets' samples under one id. (A moved dataset, whose
    old file is gone, keeps its ids.)"""
    other = (previous or {}).get("source_uri")
    if other and storage.exists(other) and not storage.same_file(other, path):
        raise RecapError(f"shard id {shard_id!r} of {path} already belongs to {other} (run {previous.get('run_id')}): "
                         f"two datasets share the folder/file name; ingest this one with --dataset NAME "
                         f"(ingest.dataset) so its shards get ids of their own")
