"""Real photos for filter tests (scikit-image ships them) and small lakes built from them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from tests.helpers import sample, write_tar

from recap_tasks.stages.ingest import ingest
from recap_tasks.lake import Lake


def photo(name: str, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    """A scikit-image sample photo as JPEG: astronaut (a person), coffee, chelsea (a cat), rocket..."""
    import skimage.data

    im = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
    if size is not None:
        im = im.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_lake(tmp_path: Path, shards: dict[str, list[tuple[str, str, bytes]]]) -> Lake:
    """A lake with the given shards ingested: {"00000.tar": [(key, caption, image bytes), ...]}."""
    paths = []
    for name, rows in shards.items():
        members = []
        for key, caption, image in rows:
            members += sample(key, caption, image)
        paths.append(str(write_tar(tmp_path / "src" / name, members)))
    lake = Lake(tmp_path / "lake")
    ingest(paths, lake)
    return lake


def by_key(lake: Lake, table: str) -> dict[str, dict]:
    from recap_tasks import lake as tables

    keys = {r["uid"]: r["key"] for r in lake.read(tables.PAIRS, ["uid", "key"]).to_pylist()}
    return {keys[r["uid"]]: r for r in lake.read(table).to_pylist()}
