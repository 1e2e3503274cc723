"""Face-blurred copies of images, stored beside the lake; captioning reads them instead of the source.

The source shard is never rewritten. The filter writes one parquet file per (shard, run) under
`_blurred/<shard id, quoted>/<run id>.parquet` with columns uid and image (the blurred bytes);
`read_images(rows, lake=lake)` swaps them in by uid.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote

import pyarrow as pa

from recap_tasks.lake import Lake

BLURRED_SCHEMA = pa.schema([pa.field("uid", pa.string(), nullable=False), pa.field("image", pa.binary())])


def _folder(shard_id: str) -> str:
    return f"_blurred/{quote(shard_id, safe='')}"


def store_blurred(lake: Lake, shard_id: str, run_id: str, images: dict[str, bytes]) -> None:
    if images:
        uids = sorted(images)
        lake.write_parquet(f"{_folder(shard_id)}/{run_id}.parquet",
                           pa.table({"uid": uids, "image": [images[u] for u in uids]}, schema=BLURRED_SCHEMA))


def blurred_images(lake: Lake, shard_id: str) -> dict[str, bytes]:
    """uid -> blurred bytes for one shard (the latest run wins); cached while the files are unchanged."""
    return _read(lake.uri, shard_id, tuple(lake.list(_folder(shard_id), ".parquet")))


@lru_cache(maxsize=2)  # captioning walks one shard at a time
def _read(uri: str, shard_id: str, files: tuple[str, ...]) -> dict[str, bytes]:
    lake = Lake(uri)
    out: dict[str, bytes] = {}
    for rel in files:  # sorted: run ids sort by time
        t = lake.read_parquet(rel)
        out.update(zip(t.column("uid").to_pylist(), t.column("image").to_pylist()))
    return out
