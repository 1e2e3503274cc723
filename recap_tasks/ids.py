"""Identity: how a shard and a sample are named in every table (shard id, shard key, uid)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from recap_tasks.storage import is_remote


def shard_id_for(path: str | os.PathLike[str], dataset: str | None = None) -> str:
    """`<folder>/<file>`, or `<dataset>/<folder>/<file>` for a named dataset (ingest.dataset).

    Stable when a dataset folder moves, also between a bucket and a local copy: for an `s3://` URI
    the folder is the key's last prefix (the bucket for a key at its root), taken as written, so
    `s3://b/x/shards/00000.tar` and `/data/shards/00000.tar` are both `shards/00000.tar`. Two
    datasets whose shards share a folder and file name (img2dataset writes `<out>/shards/00000.tar`
    for every dataset) need names of their own: ingest refuses a shard whose id another existing
    source file already holds.
    """
    if is_remote(path):
        sid = "/".join(path.rstrip("/").split("://", 1)[1].split("/")[-2:])
    else:
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
