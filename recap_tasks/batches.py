"""Publish batches: the rows validate checked, and whether they were published."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import faults
from recap_tasks import lake as tables
from recap_tasks.hygiene import word_counts
from recap_tasks.lake import Lake, not_in


@dataclass
class Batch:
    batch_id: str  # the validating run's id
    rows: int
    success: bool
    failed: list[str] = field(default_factory=list)  # names of failed expectations
    validated_at: str = ""
    report: str | None = None  # path of the Data Docs page for this validation
    quarantined: int = 0  # rows of the batch put in quarantine (not published)
    results: list[dict] = field(default_factory=list)  # one entry per expectation, for reports
    published: bool = False
    published_version: int | None = None
    shards: list[str] = field(default_factory=list)  # the shards whose rows the batch holds

    def save(self, lake: Lake) -> None:
        faults.reached("record")
        lake.write_json(f"{_DIR}/{self.batch_id}.json", asdict(self))

    @classmethod
    def load(cls, lake: Lake, batch_id: str) -> "Batch | None":
        raw = lake.read_json(f"{_DIR}/{batch_id}.json")
        return cls(**raw) if raw else None


_DIR = "_batches"


def all_batches(lake: Lake) -> list[Batch]:
    out = [Batch(**lake.read_json(rel)) for rel in lake.list(_DIR, ".json")]
    return sorted(out, key=lambda b: b.validated_at)


def recorded_ids(lake: Lake) -> set[str]:
    """The ids of every recorded batch (one listing; no record is read)."""
    return {rel.rsplit("/", 1)[-1][: -len(".json")] for rel in lake.list(_DIR, ".json")}


def write_uids(lake: Lake, batch: Batch, uids: pa.Array) -> None:
    lake.write_parquet(f"{_DIR}/{batch.batch_id}.uids.parquet", pa.table({"uid": uids}))


def read_uids(lake: Lake, batch: Batch) -> pa.Array:
    return lake.read_parquet(f"{_DIR}/{batch.batch_id}.uids.parquet").column("uid").combine_chunks()


def candidate_rows(lake: Lake, shard_ids: list[str], uids: pa.Array | None = None) -> pa.Table:
    """Rows of `shard_ids` as they would be published: captions joined with their pairs.

    Without `uids`: every captioned row of those shards that is neither published nor quarantined.
    Reads only those shards' partitions.
    """
    captions = lake.read(tables.CAPTIONS, shards=shard_ids)
    if uids is not None:
        captions = captions.filter(pc.is_in(captions.column("uid"), value_set=uids))
    else:
        settled = pa.concat_arrays([lake.uids(tables.RECAP, shards=shard_ids),
                                    lake.uids(tables.QUARANTINE, shards=shard_ids)])
        captions = captions.filter(not_in(captions.column("uid"), settled))
    pairs = lake.read(tables.PAIRS, ["uid", "key", "url", "org_caption", "sha256", "source_uid", "width", "height"],
                      shards=shard_ids)
    keep = ["uid", "shard_id", "re_caption", "model", "prompt", "generation", "is_refusal", "prompt_echo",
            "distinct_ngram_ratio", "re_clip_score", "org_clip_score", "clip_model", "re_clip_truncated", "run_id"]
    rows = captions.select(keep).join(pairs, "uid", join_type="inner")
    rows = rows.rename_columns({"run_id": "caption_run_id"})
    rows = rows.append_column("re_length", _words(rows.column("re_caption")))
    rows = rows.append_column("org_length", _words(rows.column("org_caption")))
    return rows.sort_by("uid")


def _words(texts: pa.ChunkedArray) -> pa.Array:
    return pa.array(word_counts(texts.to_pylist()), pa.int32())
