"""Arrow schemas of the lake's Delta tables, in one place so every stage agrees on them."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

_TS = pa.timestamp("us", tz="UTC")


# Every table of per-shard rows carries the shard's key (ids.shard_key: 16 hex digits of
# sha1(shard id)) and is partitioned by its bucket, the key's first BUCKET_DIGITS hex digits: 16
# partitions whatever the shard count (~80M rows each at 1.3B rows). Every commit adds a file to each
# bucket it writes and, once folded, a tombstone per file to every checkpoint for 7 days, so the
# bucket count is what the log grows by per commit between maintains: with 256 buckets, 130,000
# shards written in 65 commits left 20,456 tombstones and opened 3.5-4.9x slower than a 1,000-shard
# lake; with 16, 1,344 and 1.0-1.2x (BENCHMARKS.md, "Table metadata between maintains"). Within a
# bucket, files are written and compacted sorted by shard_key, so the per-file statistics in the
# Delta log (and the row groups' own) prune a read to the shard's files and row groups.
SHARD_KEY = "shard_key"
SHARD_BUCKET = "shard_bucket"
BUCKET_DIGITS = 1


def bucket_of(shard_key: str) -> str:
    """The partition (bucket) of a shard key."""
    return shard_key[:BUCKET_DIGITS]


@dataclass(frozen=True)
class TableSchema:
    name: str
    arrow: pa.Schema
    partition_by: tuple[str, ...] = (SHARD_BUCKET,)
    # The columns whose min/max statistics each file's add action carries in the Delta log: only
    # those reads prune files by. Every other column's statistics would be parsed at each open of
    # the table for nothing: with all ~25 columns, a file's add action was ~1.1 KB and the
    # checkpoint of 16,600 files 18.5 MB (0.12 s to open); with shard_key alone, 3.9 MB (0.04 s).
    stats_columns: tuple[str, ...] = (SHARD_KEY,)
    # A checkpoint every this many commits (`delta.checkpointInterval`, delta-rs's default 100).
    # Bucketed tables: every 2, so an open replays at most one JSON commit after the latest
    # checkpoint. delta-rs reads each JSON commit as a file of its own, ~1 ms apiece however small
    # (7 of them after a checkpoint every 10 made a 130,000-shard table open 1.8x slower); writing its
    # 0.14 MB checkpoint is inside the insert figures of BENCHMARKS.md, "Table metadata between
    # maintains". The record tables keep 10: their checkpoints carry a tombstone per folded record
    # file, and every 2 commits made a progress record's append ~1.5x slower at 1,000 records.
    checkpoint_interval: int = 2

    def empty_table(self) -> pa.Table:
        return self.arrow.empty_table()

    @property
    def properties(self) -> dict[str, str]:
        """The Delta table properties a table is created with (`recap maintain` sets them on older
        tables)."""
        return {"delta.dataSkippingStatsColumns": ",".join(self.stats_columns),
                "delta.checkpointInterval": str(self.checkpoint_interval)}


PAIRS = TableSchema(
    "pairs",
    pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),  # stable: hash of (shard id, key, occurrence)
            pa.field("key", pa.string()),
            pa.field("url", pa.string()),
            pa.field("org_caption", pa.string()),
            pa.field("sha256", pa.string()),  # of the image bytes as stored in the source
            # The source dataset's own id (DataComp `uid`, LAION `SAMPLE_ID`), to join back to it.
            pa.field("source_uid", pa.string()),
            # JSON list of human reference captions or object labels the sample carried (COCO's 5
            # `captions`), for the report's hallucination measure; null when it carried none.
            pa.field("references", pa.string()),
            # Face boxes the source's metadata carried (DataComp's `face_bboxes`), checked at ingest:
            # JSON [[x1, y1, x2, y2], ...] normalized to [0, 1] of the upright image. "[]" = the
            # source's detector ran and found none; null = no usable boxes (none carried, or malformed:
            # ingest counts those). A JSON string like `references` and `filter_results.face_boxes`:
            # one flat type that every reader (delta-rs, pyarrow, the Dask workers) round-trips alike.
            pa.field("face_bboxes", pa.string()),
            # The CLIP score the source's metadata carried (DataComp's clip_l14_similarity_score, or
            # its ViT-B/32 one, or LAION's `similarity`), and which model made it. Kept apart from
            # our own org_clip_score, which uses the configured CLIP for both captions.
            pa.field("source_clip_score", pa.float32()),
            pa.field("source_clip_model", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("image_format", pa.string()),  # PIL format name: JPEG, PNG, WEBP
            # Pointer to the image in its source shard; images are never copied into tables.
            pa.field("source_uri", pa.string()),  # the shard file: an absolute local path or an s3:// URI
            pa.field("source_format", pa.string()),  # "wds" or "parquet"
            pa.field("image_offset", pa.int64()),  # wds: byte offset of the member's data
            pa.field("image_size", pa.int64()),  # wds: member size in bytes
            pa.field("source_row", pa.int64()),  # parquet: row index in the file
            pa.field("image_column", pa.string()),  # parquet: column holding the bytes
            pa.field("shard_id", pa.string()),  # "<folder>/<file>": the work unit
            pa.field(SHARD_KEY, pa.string()),  # ids.shard_key(shard_id): the clustering key
            pa.field(SHARD_BUCKET, pa.string()),  # partition: bucket_of(shard_key)
            pa.field("run_id", pa.string()),
            pa.field("ingested_at", _TS),
        ]
    ),
)

REJECTED = TableSchema(
    "rejected",
    pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("key", pa.string()),
            pa.field("shard_id", pa.string()),
            pa.field(SHARD_KEY, pa.string()),
            pa.field(SHARD_BUCKET, pa.string()),
            pa.field("stage", pa.string()),  # download | ingest | filter | caption | validate
            pa.field("reason", pa.string()),  # short snake_case, doubles as a statistics key
            pa.field("detail", pa.string()),  # human-readable context (exception text, values)
            pa.field("run_id", pa.string()),
            pa.field("rejected_at", _TS),
        ]
    ),
)

FILTER_RESULTS = TableSchema(
    "filter_results",
    pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("shard_id", pa.string()),
            pa.field(SHARD_KEY, pa.string()),
            pa.field(SHARD_BUCKET, pa.string()),
            pa.field("kept", pa.bool_()),
            pa.field("reason", pa.string()),  # null when kept
            # Scores are kept beside the verdict so thresholds can change without recomputing.
            pa.field("caption_words", pa.int32()),
            pa.field("caption_chars", pa.int32()),
            pa.field("min_side", pa.int32()),
            pa.field("aspect_ratio", pa.float32()),
            pa.field("english_score", pa.float32()),  # fastText lid.176 probability of English
            pa.field("nsfw_score", pa.float32()),  # open_nsfw probability
            pa.field("faces", pa.int32()),  # faces found (blurred in what captioning reads)
            # JSON [[x1, y1, x2, y2, score], ...] in upright source pixels (score null for boxes from
            # metadata), and where the boxes came from: "metadata" (pairs.face_bboxes) or "detector".
            pa.field("face_boxes", pa.string()),
            pa.field("face_source", pa.string()),
            pa.field("phash", pa.int64()),  # 64-bit DCT perceptual hash
            pa.field("duplicate_of", pa.string()),  # uid of the surviving copy, for duplicates
            pa.field("phash_distance", pa.int32()),  # Hamming bits to that copy (0 = same sha256)
            pa.field("caption_repeats", pa.int32()),  # distinct images with the same normalised caption
            pa.field("clip_score", pa.float32()),  # cosine(image, original caption), filter.clip_model
            pa.field("run_id", pa.string()),
            pa.field("filtered_at", _TS),
        ]
    ),
)

CAPTIONS = TableSchema(
    "captions",
    pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("shard_id", pa.string()),
            pa.field(SHARD_KEY, pa.string()),
            pa.field(SHARD_BUCKET, pa.string()),
            pa.field("re_caption", pa.string()),
            pa.field("model", pa.string()),
            pa.field("prompt", pa.string()),
            pa.field("generation", pa.string()),  # JSON of the decoding settings
            # Hygiene flags, checked by the quality gates.
            pa.field("is_refusal", pa.bool_()),
            pa.field("prompt_echo", pa.bool_()),
            pa.field("distinct_ngram_ratio", pa.float32()),
            # CLIP cosine similarities of the image with each caption (null until scored), and
            # whether the recaption was cut at the CLIP text encoder's token limit.
            pa.field("re_clip_score", pa.float32()),
            pa.field("org_clip_score", pa.float32()),
            pa.field("clip_model", pa.string()),
            pa.field("re_clip_truncated", pa.bool_()),
            pa.field("run_id", pa.string()),
            pa.field("captioned_at", _TS),
        ]
    ),
)

# The released Recap-DataComp-1B columns first, then our own identity and provenance.
RECAP = TableSchema(
    "recap",
    pa.schema(
        [
            pa.field("url", pa.string()),
            pa.field("re_caption", pa.string()),
            pa.field("org_caption", pa.string()),
            pa.field("sha256", pa.string()),
            pa.field("key", pa.string()),
            pa.field("re_clip_score", pa.float32()),  # null until CLIP scoring exists
            pa.field("org_clip_score", pa.float32()),
            pa.field("re_length", pa.int32()),  # words
            pa.field("org_length", pa.int32()),
            pa.field("uid", pa.string(), nullable=False),
            pa.field("source_uid", pa.string()),  # the source dataset's id (DataComp uid, LAION SAMPLE_ID)
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("shard_id", pa.string()),
            pa.field(SHARD_KEY, pa.string()),
            pa.field(SHARD_BUCKET, pa.string()),
            pa.field("model", pa.string()),
            pa.field("prompt", pa.string()),
            pa.field("generation", pa.string()),
            pa.field("clip_model", pa.string()),  # which CLIP produced the two scores
            pa.field("re_clip_truncated", pa.bool_()),  # recaption cut at CLIP's text token limit
            pa.field("caption_run_id", pa.string()),
            pa.field("publish_run_id", pa.string()),
            pa.field("published_at", _TS),
        ]
    ),
)

# Captioned rows that failed row-level quality checks: kept apart, never published, with the
# names of the expectations they failed.
QUARANTINE = TableSchema(
    "quarantine",
    pa.schema(
        [
            pa.field("uid", pa.string(), nullable=False),
            pa.field("key", pa.string()),
            pa.field("shard_id", pa.string()),
            pa.field(SHARD_KEY, pa.string()),
            pa.field(SHARD_BUCKET, pa.string()),
            pa.field("batch_id", pa.string()),
            pa.field("failed", pa.list_(pa.string())),
            pa.field("re_caption", pa.string()),
            pa.field("model", pa.string()),
            pa.field("quarantined_at", _TS),
        ]
    ),
)

# One record per (shard, stage) each time a stage finishes a shard: the shard's absolute counts at
# that stage, recomputed from the shard's partitions (so a rerun after a crash rewrites it right).
# The latest record per (shard, stage) wins. `recap status`, pending-work lookups and the Airflow
# planner read this small table instead of the row tables.
PROGRESS = TableSchema(
    "progress",
    pa.schema(
        [
            pa.field("shard_id", pa.string(), nullable=False),
            pa.field("stage", pa.string(), nullable=False),  # download | ingest | filter | caption | publish
            pa.field("rows_in", pa.int64()),  # rows the stage has for the shard
            pa.field("rows_out", pa.int64()),  # passed / kept / captioned / published
            pa.field("rejected", pa.int64()),  # rejected at this stage (publish: quarantined)
            pa.field("reasons", pa.string()),  # JSON {reason: rows}
            # ingest only: the source file as read, to tell a changed shard from a finished one
            pa.field("source_uri", pa.string()),
            pa.field("size", pa.int64()),
            pa.field("mtime_ns", pa.int64()),
            pa.field("truncated", pa.bool_()),
            pa.field("detail", pa.string()),
            pa.field("run_id", pa.string()),
            pa.field("recorded_at", _TS),
        ]
    ),
    partition_by=("stage",),
    stats_columns=("shard_id",),
    checkpoint_interval=10,
)

# Corpus-dedup lookups against history: one entry per kept image and kind, partitioned by kind.
# kind "sha": key = first 64 bits of the sha256; kind "b<bands>-<i>": key = band i of the pHash
# (pigeonhole banding: images within d bits share at least one of d+1 bands exactly). Files are
# sorted by key with small row groups, so a lookup reads only the row groups its keys fall in.
DEDUP_INDEX = TableSchema(
    "dedup_index",
    pa.schema(
        [
            pa.field("kind", pa.string(), nullable=False),
            pa.field("key", pa.int64(), nullable=False),
            pa.field("phash", pa.int64()),
            pa.field("sha256", pa.string()),
            pa.field("uid", pa.string(), nullable=False),
        ]
    ),
    partition_by=("kind",),
    stats_columns=("key",),
    checkpoint_interval=10,
)

TABLES = {t.name: t for t in (PAIRS, REJECTED, FILTER_RESULTS, CAPTIONS, RECAP, QUARANTINE, PROGRESS, DEDUP_INDEX)}
# Tables whose rows belong to one source shard each (partitioned by shard bucket).
SHARD_TABLES = tuple(t.name for t in TABLES.values() if t.partition_by == (SHARD_BUCKET,))
