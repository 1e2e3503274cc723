"""Readers turn one source shard into raw samples; they decide nothing about quality."""

from __future__ import annotations

import glob
import hashlib
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


def shard_id_for(path: str | os.PathLike[str], dataset: str | None = None) -> str:
    """`<folder>/<file>`, or `<dataset>/<folder>/<file>` for a named dataset (ingest.dataset).

    Stable when a dataset folder moves. Two datasets whose shards share a folder and file name
    (img2dataset writes `<out>/shards/00000.tar` for every dataset) need names of their own:
    ingest refuses a shard whose id another existing source file already holds.
    """
    p = Path(path).resolve()
    sid = f"{p.parent.name}/{p.name}"
    return f"{dataset}/{sid}" if dataset else sid


def shard_key(shard_id: str) -> str:
    """A shard's key in every lake table: 16 hex digits of sha1(shard id). Tables are clustered by
    it, and partitioned by its first digits (schemas.bucket_of).

    Shard ids hold `/` and any character a file name may; a fixed-width hex key is safe as a folder
    name on every filesystem and object store, and spreads shards evenly over the buckets.
    """
    return hashlib.sha1(shard_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def make_uid(shard_id: str, key: str, occurrence: int = 0) -> str:
    """The same input (shard, key, occurrence of the key) always gives the same uid."""
    raw = f"{shard_id}\x1f{key}\x1f{occurrence}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()[:32]


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
