"""Readers turn one source shard into raw samples; they decide nothing about quality."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from recap_tasks import storage
from recap_tasks.errors import RecapError

SHARD_SUFFIXES = (".tar", ".parquet")


@dataclass
class RawSample:
    """One sample as read from a shard, before any check.

    `error` is set when the reader itself could not make a sample of it (unsafe member name,
    duplicate key, a shard cut off mid-member); ingest records those as rejections.
    """

    key: str
    occurrence: int = 0  # >0 for the 2nd, 3rd... sample with the same key in one shard
    image: bytes | None = None
    image_ext: str | None = None
    image_offset: int | None = None
    image_size: int | None = None
    source_row: int | None = None
    caption: str | bytes | None = None  # bytes from tar members (decoded by ingest), str from parquet
    url: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    detail: str | None = None


@dataclass
class ShardReport:
    """What a reader noticed about a shard as a whole."""

    truncated: bool = False
    detail: str | None = None


def expand_sources(sources: list[str]) -> list[str]:
    """Folders, globs and files (local or s3://) -> a sorted, de-duplicated list of shard files (absolute
    paths or s3:// URIs)."""
    found: dict[str, None] = {}
    for source in sources:
        if not source or not source.strip():
            raise RecapError("an empty source names no shards: give a folder, glob or shard file")
        matches = storage.list_files(source, SHARD_SUFFIXES, what="a .tar or .parquet shard",
                                     plural=".tar or .parquet shards", noun="source")
        named, listed = storage.normalize(source), set(matches)
        for m in matches:
            # img2dataset writes a metadata parquet beside each tar: not a source (unless named itself)
            if m.endswith(".parquet") and m != named and _beside_tar(m, listed):
                continue
            found[m] = None
    return list(found)


def _beside_tar(parquet: str, listed: set[str]) -> bool:
    tar = parquet.removesuffix(".parquet") + ".tar"
    return tar in listed or storage.exists(tar)
