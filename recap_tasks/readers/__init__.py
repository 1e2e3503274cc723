"""Readers turn one source shard into raw samples; they decide nothing about quality."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

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


def expand_sources(sources: list[str]) -> list[Path]:
    """Folders, globs and files -> a sorted, de-duplicated list of shard files."""
    found: dict[Path, None] = {}
    for source in sources:
        if not source or not source.strip():
            raise RecapError("an empty source names no shards: give a folder, glob or shard file")
        p = Path(source).expanduser()
        for m in expand_files(source, SHARD_SUFFIXES, what="a .tar or .parquet shard", plural=".tar or .parquet shards",
                              noun="source"):
            if m.suffix == ".parquet" and m.with_suffix(".tar").is_file() and m != p:
                continue  # img2dataset writes a metadata parquet beside each tar: not a source
            found[m.resolve()] = None
    return list(found)


def expand_files(source: str, suffixes, *, what: str, plural: str, noun: str) -> list[Path]:
    """The files with `suffixes` that a folder, glob or file name `source` names (sorted); RecapError
    when it names none (`what`: "a .tar or .parquet shard", `plural`: ".tar or .parquet shards",
    `noun`: "source")."""
    p = Path(source).expanduser()
    if p.is_dir():
        matches = sorted(q for q in p.iterdir() if q.suffix in suffixes and q.is_file())
    elif any(ch in source for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(source), recursive=True))
        matches = [m for m in matches if m.suffix in suffixes and m.is_file()]
    elif p.is_file():
        if p.suffix not in suffixes:
            raise RecapError(f"{source}: not {what}")
        matches = [p]
    else:
        raise RecapError(f"{noun} not found: {source}")
    if not matches:
        raise RecapError(f"no {plural} in {source}")
    return matches
