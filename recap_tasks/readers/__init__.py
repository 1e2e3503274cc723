"""Readers turn one source shard into raw samples; they decide nothing about quality."""

from __future__ import annotations

import contextlib
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
        named = storage.normalize(source)
        # img2dataset writes a metadata parquet beside each tar: not a source (unless named itself).
        # A folder's listing holds its tars; a glob may leave them out, so their folders are listed
        # once each (never a request per parquet: 130,000 of them on S3 would be 130,000 HEADs).
        tars = set(matches) if not any(ch in source for ch in "*?[") else _tars_beside(matches)
        for m in matches:
            if m.endswith(".parquet") and m != named and m.removesuffix(".parquet") + ".tar" in tars:
                continue
            found[m] = None
    return list(found)


def _tars_beside(files: list[str]) -> set[str]:
    """The .tar files in the folders holding the .parquet `files`: one listing per folder."""
    tars: set[str] = set()
    for folder in sorted({f.rsplit("/", 1)[0] for f in files if f.endswith(".parquet")}):
        with contextlib.suppress(RecapError):  # a folder without tars
            tars.update(storage.list_files(folder, (".tar",), what="a .tar", plural=".tar files", noun="folder"))
    return tars
