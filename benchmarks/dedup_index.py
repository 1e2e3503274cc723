"""Near-duplicate lookups against the corpus dedup index as it grows: cost per new image and recall.

Usage: python benchmarks/dedup_index.py [--entries 10000000 100000000] [--radius 2 4] [--batch 239 10000]
                                        [--compare] [--data ../shared/data] [--workdir DIR (keeps the seeded indexes)]

Part 1, what a radius means on real images: every COCO photo of ../shared/data/coco-mini-wds is
re-encoded and resized the ways the web copies images (JPEG quality 75 and 40, half size, 90% centre
crop, PNG round trip), and the pHash distance of each copy to its original is tallied: the share of
copies each radius catches.

Part 2, cost at scale: for each radius and index size, an index of that many entries (kept images x
(1 sha entry + radius+1 band entries), random pHashes, as `recap maintain` leaves it: each kind
sorted by key, row groups of dedup_index.ROW_GROUP) is seeded through the project's writer, then
a batch of new images is looked up with `dedup_index.history` (what the filter calls per shard) in
a fresh process: half of the batch are planted near-duplicates of indexed images (1..radius bits
flipped), half are new. Prints seconds per new image, row groups read, and recall on the planted
copies (pigeonhole banding is exact within the radius: recall must be 1.0).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_CHUNK = 5_000_000  # images seeded per write


def radius_coverage(data: Path) -> dict:
    """pHash distance of common web re-encodings of each COCO photo to the original."""
    from PIL import Image

    from recap_tasks.filters.dedup import hamming, phash

    def jpeg(im, q):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    def png(im):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    def crop(im, f):
        w, h = im.size
        dw, dh = int(w * (1 - f) / 2), int(h * (1 - f) / 2)
        return im.crop((dw, dh, w - dw, h - dh))

    copies = {"jpeg q75": lambda im: jpeg(im, 75), "jpeg q40": lambda im: jpeg(im, 40),
              "half size": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
              "half size + jpeg q75": lambda im: jpeg(im.resize((im.width // 2, im.height // 2)), 75),
              "png round trip": png, "90% centre crop": lambda im: crop(im, 0.9)}
    dist: dict[str, list[int]] = {k: [] for k in copies}
    for src in sorted((data / "coco-mini-wds").glob("*.tar")):
        with tarfile.open(src) as tf:
            for m in tf.getmembers():
                if m.isfile() and m.name.endswith((".jpg", ".jpeg", ".png")):
                    im = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                    h = phash(im)
                    for name, fn in copies.items():
                        dist[name].append(hamming(h, phash(fn(im))))
    return dist


def _hex(n: int, nbytes: int, rng):
    """n random values of `nbytes` bytes: (the raw bytes as an (n, nbytes) array, their lowercase hex
    strings), built without a Python loop."""
    import numpy as np
    import pyarrow as pa

    raw = rng.integers(0, 256, n * nbytes, dtype=np.uint8)
    text = raw.tobytes().hex().encode()
    offsets = np.arange(0, 2 * nbytes * n + 1, 2 * nbytes, dtype=np.int64)
    strings = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(text))
    return raw.reshape(n, nbytes), strings.cast(pa.string())


def seed(lake_dir: Path, entries: int, radius: int) -> None:
    """An index of `entries` entries (images x kinds) for `radius`, each kind sorted by key."""
    import numpy as np
    import pyarrow as pa
    from deltalake import WriterProperties

    from recap_tasks import schemas
    from recap_tasks.filters import dedup_index
    from recap_tasks.lake import DEDUP_INDEX, Lake

    lake = Lake(lake_dir)
    kinds = dedup_index.band_kinds(radius)
    images = entries // (len(kinds) + 1)
    rng = np.random.default_rng(0)
    phash = rng.integers(-2**63, 2**63 - 1, images, dtype=np.int64)
    np.save(lake_dir.parent / f"{lake_dir.name}.phash.npy", phash)
    _, uid = _hex(images, 16, rng)
    sha_raw, sha = _hex(images, 32, rng)
    props = WriterProperties(max_row_group_size=dedup_index.ROW_GROUP)
    lake.ensure(DEDUP_INDEX)
    # dedup_index.sha_key: the first 64 bits of the digest, big-endian, as int64.
    sha_keys = np.ascontiguousarray(sha_raw[:, :8]).view(">u8").ravel().astype(np.uint64).view(np.int64)
    del sha_raw
    parts = [(dedup_index.SHA, sha_keys)] + [(kind, dedup_index.band_key(phash, shift, width))
                                            for kind, shift, width in kinds]
    for kind, keys in parts:
        order = np.argsort(keys, kind="stable")
        for start in range(0, images, _CHUNK):  # chunks of one sorted run: disjoint key ranges per file
            idx = order[start:start + _CHUNK]
            n = len(idx)
            take = pa.array(idx)
            table = pa.table({"kind": pa.array([kind] * n, pa.string()), "key": pa.array(keys[idx]),
                              "phash": pa.array(phash[idx]) if kind == dedup_index.SHA else pa.nulls(n, pa.int64()),
                              "sha256": sha.take(take) if kind == dedup_index.SHA else pa.nulls(n, pa.string()),
                              "uid": uid.take(take)}, schema=schemas.DEDUP_INDEX.arrow)
            lake.append(DEDUP_INDEX, table, writer_properties=props)
        print(f"  seeded {kind}: {images:,} entries", file=sys.stderr, flush=True)
    lake.delta(DEDUP_INDEX).create_checkpoint()
    t0 = time.perf_counter()
    built = dedup_index.build_runs(lake)  # as `recap maintain` leaves the index
    print(f"  runs: {built['runs_written']} written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def lookup_once(lake_dir: Path, radius: int, batch: int, path: str) -> dict:
    """Look up `batch` new images (half planted near-duplicates) in a fresh process, through the
    index files' sorted runs (`path` "runs", what the product does) or their Parquet footers alone
    ("footers": the lookup before runs, and what files appended since the last maintain take)."""
    import numpy as np
    import pyarrow as pa

    from recap_tasks.filters import dedup_index, dedup_runs
    from recap_tasks.lake import Lake

    if path == "footers":
        dedup_runs.lookup = lambda *args, **kwargs: None
    reads = _count_run_reads()

    phash = np.load(lake_dir.parent / f"{lake_dir.name}.phash.npy", mmap_mode="r")
    rng = np.random.default_rng(1)
    planted = batch // 2
    targets = rng.choice(len(phash), planted, replace=False)
    probes = np.array(phash[targets]).view(np.uint64)
    for i in range(planted):  # 1..radius distinct bits flipped
        bits = rng.choice(64, int(rng.integers(1, radius + 1)) if radius else 0, replace=False)
        for b in bits:
            probes[i] ^= np.uint64(1) << np.uint64(int(b))
    fresh = rng.integers(-2**63, 2**63 - 1, batch - planted, dtype=np.int64)
    hashes = np.concatenate([probes.view(np.int64), fresh])
    rows = pa.table({"uid": [f"new{i}" for i in range(batch)],
                     "sha256": [f"{i:064x}" for i in range(batch)], "phash": pa.array(hashes)})
    lake = Lake(lake_dir)
    counter = _count_row_groups()
    t0 = time.perf_counter()
    found = dedup_index.history(lake, rows, radius)
    seconds = time.perf_counter() - t0
    wanted = set(np.array(phash[targets]).tolist())
    got = set(found.column("phash").to_pylist())
    return {"seconds": seconds, "per_image_ms": 1000 * seconds / batch, "found": found.num_rows,
            "recall": len(wanted & got) / planted, "row_groups": counter(), "run_reads": reads(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _count_run_reads():
    """Counts the ranged reads the lookups make in runs."""
    from recap_tasks.filters import dedup_runs

    seen = [0]
    original = dedup_runs.Run._gather

    def counted(self, base, width, idx):
        before = self.reads
        out = original(self, base, width, idx)
        seen[0] += self.reads - before
        return out

    dedup_runs.Run._gather = counted
    return lambda: seen[0]


def _count_row_groups():
    """Counts the row groups the lookups read (wraps ParquetFile.read_row_groups)."""
    import pyarrow.parquet as pq

    seen = [0]
    original = pq.ParquetFile.read_row_groups

    def counted(self, row_groups, *args, **kwargs):
        seen[0] += len(row_groups)
        return original(self, row_groups, *args, **kwargs)

    pq.ParquetFile.read_row_groups = counted
    return lambda: seen[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000_000, 100_000_000])
    parser.add_argument("--radius", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, nargs="+", default=[239, 10_000])
    parser.add_argument("--repeat", type=int, default=3, help="lookups per size; the fastest is kept")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, help="keep seeded indexes here and reuse them")
    parser.add_argument("--_seed", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true",
                        help="also time the lookup through Parquet footers alone (no runs), in the same run")
    parser.add_argument("--_lookup", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._seed:
        seed(Path(args._seed[0]), int(args._seed[1]), int(args._seed[2]))
        return
    if args._lookup:
        print(json.dumps(lookup_once(Path(args._lookup[0]), int(args._lookup[1]), int(args._lookup[2]),
                                      args._lookup[3])))
        return
    print(f"machine: {describe()}")
    if (args.data / "coco-mini-wds").is_dir():
        import numpy as np

        dist = radius_coverage(args.data)
        radii = sorted(set(args.radius) | {0, 1, 2, 3, 4, 6, 8})
        print("pHash distance of re-encoded copies to their original (COCO photos): share within radius")
        print(f"{'copy':<24}" + "".join(f"{f'<={r}':>7}" for r in radii) + f"{'median':>8}")
        for name, d in dist.items():
            a = np.array(d)
            print(f"{name:<24}" + "".join(f"{np.mean(a <= r):>7.2f}" for r in radii) + f"{np.median(a):>8.0f}")
        print(f"({len(next(iter(dist.values())))} photos)")
    paths = ["runs", "footers"] if args.compare else ["runs"]
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        results = {}
        for radius in args.radius:
            for n in args.entries:
                seeded = work / f"index-{n}-r{radius}"
                if not (seeded / ".seeded-runs").exists():
                    shutil.rmtree(seeded, ignore_errors=True)
                    t0 = time.perf_counter()
                    subprocess.run([sys.executable, __file__, "--_seed", str(seeded), str(n), str(radius)], check=True)
                    (seeded / ".seeded-runs").write_text(f"{n}\n")
                    print(f"  radius {radius}, {n:,} entries: seeded in {time.perf_counter() - t0:.0f} s", flush=True)
                for batch in args.batch:
                    for path in paths:
                        runs = []
                        for _ in range(args.repeat):
                            proc = subprocess.run([sys.executable, __file__, "--_lookup", str(seeded), str(radius),
                                                   str(batch), path], check=True, capture_output=True, text=True)
                            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                        best = min(runs, key=lambda r: r["seconds"])
                        results[radius, n, batch, path] = best
                        print(f"  radius {radius}, {n:>11,} entries, {batch:>6,} new images, {path:>7}: "
                              f"{best['per_image_ms']:.3f} ms/image, {best['row_groups']:,} row groups and "
                              f"{best['run_reads']:,} run reads, recall {best['recall']:.3f}, "
                              f"peak RSS {best['peak_rss_mib']:.0f} MiB", flush=True)
                if not args.workdir:
                    shutil.rmtree(seeded, ignore_errors=True)
        print(f"{'radius':>6} {'new images':>10} {'lookup':>8}" + "".join(f"{f'{n:,} entries':>22}" for n in args.entries)
              + "".join(f"{f'x {n:,}':>16}" for n in args.entries[1:]))
        for radius in args.radius:
            for batch in args.batch:
                for path in paths:
                    got = [results[radius, n, batch, path] for n in args.entries]
                    line = f"{radius:>6} {batch:>10,} {path:>8}" + "".join(f"{r['per_image_ms']:>16.3f} ms/im" for r in got)
                    line += "".join(f"{r['per_image_ms'] / got[0]['per_image_ms']:>15.2f}x" for r in got[1:])
                    print(line)

if __name__ == "__main__":
    main()
