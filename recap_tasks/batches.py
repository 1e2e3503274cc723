"""Publish batches: the rows validate checked, and whether they were published."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import lake as tables
from recap_tasks.lake import Lake, not_in


@dataclass
class Batch:
    batch_id: str  # the validating run's id
    rows: int
    success: bool
    failed: list[str] = field(default_factory=list)  # names of failed expectations
    validated_at: str = ""
    report: str | None = None  # path of the Data Docs page for this validation
    published: bool = False
    published_version: int | None = None

    def save(self, lake: Lake) -> None:
        lake.write_json(f"{_DIR}/{self.batch_id}.json", asdict(self))

    @classmethod
    def load(cls, lake: Lake, batch_id: str) -> "Batch | None":
        raw = lake.read_json(f"{_DIR}/{batch_id}.json")
        return cls(**raw) if raw else None


_DIR = "_batches"


def all_batches(lake: Lake) -> list[Batch]:
    out = [Batch(**lake.read_json(rel)) for rel in lake.list(_DIR, ".json")]
    return sorted(out, key=lambda b: b.validated_at)


def write_uids(lake: Lake, batch: Batch, uids: pa.Array) -> None:
    lake.write_parquet(f"{_DIR}/{batch.batch_id}.uids.parquet", pa.table({"uid": uids}))


def read_uids(lake: Lake, batch: Batch) -> pa.Array:
    return lake.read_parquet(f"{_DIR}/{batch.batch_id}.uids.parquet").column("uid").combine_chunks()


def word_count(texts: pa.Array) -> pa.Array:
    """Words as the released table counts them: whitespace-separated tokens."""
    return pa.array([len(t.split()) if t else 0 for t in texts.to_pylist()], pa.int32())


def candidate_rows(lake: Lake, uids: pa.Array | None = None) -> pa.Table:
    """Rows as they would be published: captions joined with their pairs (unpublished, or `uids`)."""
    captions = lake.read(tables.CAPTIONS)
    if uids is not None:
        captions = captions.filter(pc.is_in(captions.column("uid"), value_set=uids))
    else:
        captions = captions.filter(not_in(captions.column("uid"), lake.uids(tables.RECAP)))
    pairs = lake.read(tables.PAIRS, ["uid", "key", "url", "org_caption", "sha256", "width", "height"])
    rows = captions.select(["uid", "shard_id", "re_caption", "model", "prompt", "generation", "run_id"]).join(
        pairs, "uid", join_type="inner")
    rows = rows.rename_columns({"run_id": "caption_run_id"})
    rows = rows.append_column("re_length", word_count(rows.column("re_caption")))
    rows = rows.append_column("org_length", word_count(rows.column("org_caption")))
    return rows.sort_by("uid")
