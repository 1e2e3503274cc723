"""Export published rows as webdataset shards for CLIP training, with both captions per image.

Each sample holds `{key}.jpg` (the image bytes the captioner read: face-blurred where the filter
blurred faces), `{key}.org.txt` (original alt text), `{key}.re.txt` (recaption) and `{key}.json`
(uid, url, sha256, both CLIP scores, model). A training loader picks the original caption with
probability p and the recaption otherwise (Recap-DataComp-1B trained CLIP with p = 0.8):

    import random, webdataset as wds
    from recap_tasks.export import CaptionMixer
    ds = wds.WebDataset("out/{00000..00009}.tar").map(CaptionMixer(p_original=0.8, seed=0))
    # each sample now has sample["txt"], the caption chosen for this epoch
"""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import lake as tables
from recap_tasks.errors import RecapError
from recap_tasks.images import read_images, upright_bytes
from recap_tasks.lake import Lake
from recap_tasks.runs import progress_bar

log = logging.getLogger(__name__)

# The paper's mix: the original caption with probability 0.8, the recaption otherwise.
DEFAULT_P_ORIGINAL = 0.8

_POINTER = ["uid", "sha256", "source_uri", "source_format", "image_offset", "image_size", "source_row",
            "image_column", "shard_id", "key"]


class CaptionMixer:
    """Picks one caption per sample: the original with probability `p_original`, else the recaption."""

    def __init__(self, p_original: float = DEFAULT_P_ORIGINAL, seed: int | None = None):
        if not 0 <= p_original <= 1:
            raise ValueError("p_original must be within [0, 1]")
        self.p_original = p_original
        self.rng = random.Random(seed)

    def __call__(self, sample: dict) -> dict:
        org, re_ = sample.get("org.txt"), sample.get("re.txt")
        pick = org if (self.rng.random() < self.p_original and org) else (re_ or org)
        sample["txt"] = pick.decode("utf-8") if isinstance(pick, bytes) else pick
        return sample


def export_webdataset(lake: Lake, out_dir: str | Path, *, shard_size: int = 1000, version: int | None = None,
                      p_original: float = DEFAULT_P_ORIGINAL) -> dict:
    """Write the published table (latest or `version`) as tar shards under `out_dir`."""
    if not lake.exists(tables.RECAP):
        raise RecapError(f"nothing published in {lake.uri}: run `recap publish` first")
    if shard_size < 1:
        raise RecapError("shard_size must be positive")
    latest = lake.version(tables.RECAP)
    if version is not None and not 0 <= version <= latest:
        raise RecapError(f"--version {version}: {lake.path(tables.RECAP)} has versions 0..{latest} (`recap history`)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    version = latest if version is None else version  # the manifest names the version read
    published = lake.read_version(tables.RECAP, version).sort_by("uid")
    pairs = lake.read(tables.PAIRS, _POINTER)
    pointers = pairs.filter(pc.is_in(pairs.column("uid"), value_set=published.column("uid").combine_chunks()))
    pointers = pointers.sort_by("uid")
    if pointers.num_rows != published.num_rows:
        raise RecapError(f"{published.num_rows - pointers.num_rows} published rows have no pair in {lake.uri}/pairs")
    shards = []
    changed: list[str] = []
    bar = progress_bar(desc="export", total=published.num_rows, unit="img")
    for n, start in enumerate(range(0, published.num_rows, shard_size)):
        rows = published.slice(start, shard_size).to_pylist()
        problems: dict[int, tuple[str, str]] = {}
        images = read_images(pointers.slice(start, shard_size), lake, problems=problems)
        name = out / f"{n:05d}.tar"
        tmp = name.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for j, (row, image) in enumerate(zip(rows, images)):
                key = row["uid"]
                if image is None:  # the source changed or vanished since ingest: never ship a wrong pair
                    changed.append(key)
                    log.warning("export: %s skipped: %s", key, problems.get(j, ("image_unavailable", ""))[1])
                    continue
                meta = {k: row[k] for k in ("uid", "key", "url", "sha256", "re_clip_score", "org_clip_score",
                                            "re_length", "org_length", "model", "width", "height")}
                data, ext = upright_bytes(image)
                _add(tf, f"{key}.{ext}", data)
                _add(tf, f"{key}.org.txt", (row["org_caption"] or "").encode())
                _add(tf, f"{key}.re.txt", (row["re_caption"] or "").encode())
                _add(tf, f"{key}.json", json.dumps(meta, default=str).encode())
        tmp.replace(name)
        shards.append(name.name)
        bar.update(len(rows))
    bar.close()
    manifest = {"table": lake.path(tables.RECAP), "table_version": version,
                "rows": published.num_rows - len(changed), "skipped_source_changed": changed,
                "shards": shards, "shard_size": shard_size, "p_original": p_original,
                "fields": ["jpg|png|webp|gif (the image's own format)", "org.txt", "re.txt", "json"]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("exported %d rows in %d shards to %s", published.num_rows, len(shards), out)
    return manifest


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tf.addfile(info, io.BytesIO(data))
