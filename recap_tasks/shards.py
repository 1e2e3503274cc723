"""Which source shards a run should work on: listing, ledger lookups and chunking for fan-out."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

from recap_tasks.lake import Lake
from recap_tasks.readers import expand_sources, shard_id_for


def split_sources(source: str | list[str]) -> list[str]:
    """`"a/*.tar, b/"` -> `["a/*.tar", "b/"]`: a form field may hold several sources."""
    items = source if isinstance(source, list) else source.replace("\n", ",").split(",")
    return [s.strip() for s in items if s.strip()]


def list_shards(source: str | list[str], *, limit: int | None = None) -> list[str]:
    """Shard files under `source` (folders, globs, files), sorted; at most `limit` of them."""
    shards = [str(p) for p in expand_sources(split_sources(source))]
    return shards[:limit] if limit else shards


def ledger_entry(lake: Lake, path: str | os.PathLike[str]) -> dict | None:
    """The ingest ledger record of a shard (written by ingest when the shard is done), if any."""
    shard_id = shard_id_for(path)
    return lake.read_json(f"_ledger/ingest/{hashlib.sha1(shard_id.encode()).hexdigest()}.json")


def is_ingested(lake: Lake, path: str | os.PathLike[str]) -> bool:
    """Whether the shard is in the ledger unchanged (same size and mtime), as ingest decides it."""
    entry = ledger_entry(lake, path)
    if entry is None:
        return False
    stat = Path(path).stat()
    return entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns


def pending_shards(lake: Lake, source: str | list[str], *, limit: int | None = None) -> list[str]:
    """Shards under `source` that the ledger does not hold yet (new, or changed since ingest)."""
    pending = [p for p in list_shards(source) if not is_ingested(lake, p)]
    return pending[:limit] if limit else pending


def chunk(items: list[str], *, max_chunks: int, min_size: int = 1) -> list[list[str]]:
    """Split `items` into at most `max_chunks` contiguous chunks of near-equal size (>= min_size)."""
    if not items:
        return []
    if max_chunks < 1:
        raise ValueError("max_chunks must be >= 1")
    size = max(min_size, math.ceil(len(items) / max_chunks))
    return [items[i:i + size] for i in range(0, len(items), size)]
