"""Ingest throughput (rows/s) on ../shared/data: webdataset tars and a parquet of web images.

Usage: python benchmarks/ingest.py [--repeats 5] [--data ../shared/data]

Reports, per source, the median of N runs into fresh lakes:
  - read+check: reading the shard and checking every sample (decode, hash), no writes;
  - end to end: the ingest stage (`recap_tasks.stages.ingest.ingest`, what `recap ingest` runs) into a
    fresh lake: the same reading and checks, then its writes (`pairs` and `rejected` through
    `Lake.insert_new`, which appends the shard's new rows, and a progress record per shard).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RECAP_QUIET", "1")

from _machine import describe  # noqa: E402

from recap_tasks.config import IngestConfig  # noqa: E402
from recap_tasks.stages.ingest import _check, ingest  # noqa: E402
from recap_tasks.lake import Lake  # noqa: E402
from recap_tasks.readers import expand_sources  # noqa: E402
from recap_tasks.readers.parquet import ParquetReader  # noqa: E402
from recap_tasks.readers.webdataset import WebDatasetReader  # noqa: E402


def read_and_check(sources: list[str], config: IngestConfig) -> int:
    n = 0
    for path in expand_sources(sources):
        if path.suffix == ".tar":
            reader = WebDatasetReader(max_image_bytes=config.max_image_bytes, max_caption_bytes=config.max_caption_bytes)
        else:
            reader = ParquetReader(image_column=None, caption_column=None, key_column=None, url_column=None,
                                   max_image_bytes=config.max_image_bytes)
        for sample in reader.read(path):
            if not sample.error:
                _check(sample, config)
            n += 1
    return n


def end_to_end(sources: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        result = ingest(sources, Lake(Path(tmp) / "lake"))
        return result.rows + result.rejected


def timed(fn, *args) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn(*args)
    return n, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    args = parser.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"no data at {data}: this benchmark reads ../shared/data")
    sets = {"coco-mini-wds (3 tars, JPEG photos)": [str(data / "coco-mini-wds")],
            "cc-web-758.parquet (web images)": [str(data / "cc-web-758.parquet")]}
    config = IngestConfig()
    print(f"machine: {describe()}")
    print(f"{'source':<40} {'rows':>6} {'read+check rows/s':>18} {'end-to-end rows/s':>18}")
    for name, sources in sets.items():
        end_to_end(sources)  # warm caches and imports
        checks = [timed(read_and_check, sources, config) for _ in range(args.repeats)]
        e2e = [timed(end_to_end, sources) for _ in range(args.repeats)]
        rows = checks[0][0]
        rc = rows / statistics.median(t for _, t in checks)
        ee = rows / statistics.median(t for _, t in e2e)
        print(f"{name:<40} {rows:>6} {rc:>18.0f} {ee:>18.0f}")


if __name__ == "__main__":
    main()
