"""Which source shards a run should work on: listing, ingest-record lookups and chunking for fan-out."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from recap_tasks import storage
from recap_tasks.ids import shard_id_for
from recap_tasks.lake import Lake
from recap_tasks.readers import expand_sources


def split_sources(source: str | list[str]) -> list[str]:
    """`"a/*.tar, b/"` -> `["a/*.tar", "b/"]`: a form field may hold several sources."""
    items = source if isinstance(source, list) else source.replace("\n", ",").split(",")
    return [s.strip() for s in items if s.strip()]


def list_shards(source: str | list[str], *, limit: int | None = None) -> list[str]:
    """Shard files under `source` (folders, globs, files; local or s3://), sorted; at most `limit` of them."""
    shards = expand_sources(split_sources(source))
    return shards[:limit] if limit else shards


def ingest_records(lake: Lake, paths: Sequence[str | os.PathLike[str]], dataset: str | None = None) -> dict[str, dict]:
    """shard id -> the latest ingest progress record, for the shards at `paths` (one small read)."""
    from recap_tasks.progress import by_shard

    records = by_shard(lake, shard_ids=[shard_id_for(p, dataset) for p in paths], stages=("ingest",))
    return {s: r["ingest"] for s, r in records.items()}


def is_ingested(record: dict | None, path: str | os.PathLike[str], stat: tuple[int, int] | None = None) -> bool:
    """Whether a shard is ingested as it is now: its latest ingest record matches the file (same size
    and mtime; for an S3 object its size and Last-Modified). The one answer for ingest (skip the shard)
    and the planner (not pending). `stat`: the file's (size, mtime_ns) when the caller has it."""
    if record is None:
        return False
    size, mtime_ns = stat or storage.stat(path)
    return record.get("size") == size and record.get("mtime_ns") == mtime_ns


def shards_to_ingest(lake: Lake, source: str | list[str], *, limit: int | None = None,
                     dataset: str | None = None) -> list[str]:
    """Shards under `source` that the lake has not ingested yet (new, or changed since ingest).

    Not `progress.pending_shards`, which answers for a stage after ingest from the records alone."""
    shards = list_shards(source)
    records = ingest_records(lake, shards, dataset)
    # One stat per ingested shard (a HEAD on S3): a few at a time, as they wait on the network.
    with ThreadPoolExecutor(max_workers=16) as pool:
        done = pool.map(lambda p: is_ingested(records.get(shard_id_for(p, dataset)), p), shards)
        pending = [p for p, ingested in zip(shards, done) if not ingested]
    return pending[:limit] if limit else pending



def chunk(items: list[str], *, max_chunks: int, min_size: int = 1) -> list[list[str]]:
    """Split `items` into at most `max_chunks` contiguous chunks of near-equal size (>= min_size)."""
    if not items:
        return []
    if max_chunks < 1:
        raise ValueError("max_chunks must be >= 1")
    size = max(min_size, math.ceil(len(items) / max_chunks))
    return [items[i:i + size] for i in range(0, len(items), size)]
