"""Ingest throughput (rows/s) on ../shared/data: webdataset tars and a parquet of web images.

Usage: python benchmarks/ingest.py [--repeats 5] [--data ../shared/data] [--object-store]

Reports, per source, the median of N runs into fresh lakes:
  - read+check: reading the shard and checking every sample (decode, hash), no writes;
  - end to end: the ingest stage (`recap_tasks.stages.ingest.ingest`, what `recap ingest` runs) into a
    fresh lake: the same reading and checks, then its writes (`pairs` and `rejected` through
    `Lake.insert_new`, which appends the shard's new rows, and a progress record per shard).

With --object-store, coco-mini-wds is also read from an S3-compatible server: moto's server (a
Python process of its own on 127.0.0.1, started here; a dev dependency) holding a copy of the
shards, against the same shards on local disk, into a local lake each time. moto is no measure of
real S3 latency or bandwidth: it shows what the storage layer costs on top of the reading itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
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
        if path.endswith(".tar"):
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
    parser.add_argument("--object-store", action="store_true",
                        help="also ingest coco-mini-wds from a local S3-compatible server (moto)")
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
    if args.object_store:
        object_store(data / "coco-mini-wds", config, args.repeats)


def object_store(folder: Path, config: IngestConfig, repeats: int) -> None:
    """coco-mini-wds from local disk and from moto's S3 server, measured alternately."""
    with moto_server() as endpoint:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        for f in sorted(folder.iterdir()):
            s3.upload_file(str(f), "bench", f"coco-mini-wds/{f.name}")
        sets = {"local disk": [str(folder)], f"S3 (moto, {endpoint})": ["s3://bench/coco-mini-wds"]}
        for sources in sets.values():
            end_to_end(sources)  # warm
        checks: dict[str, list] = {name: [] for name in sets}
        e2e: dict[str, list] = {name: [] for name in sets}
        for _ in range(repeats):  # alternately, so both see the same load on a shared machine
            for name, sources in sets.items():
                checks[name].append(timed(read_and_check, sources, config))
                e2e[name].append(timed(end_to_end, sources))
        print(f"\n{'coco-mini-wds from':<40} {'rows':>6} {'read+check rows/s':>18} {'end-to-end rows/s':>18}")
        for name in sets:
            rows = checks[name][0][0]
            rc = rows / statistics.median(t for _, t in checks[name])
            ee = rows / statistics.median(t for _, t in e2e[name])
            print(f"{name:<40} {rows:>6} {rc:>18.0f} {ee:>18.0f}")


@contextlib.contextmanager
def moto_server():
    """moto's S3 server in a process of its own on a free port of 127.0.0.1; sets the AWS_* variables."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit("moto's S3 server did not start (is moto installed? pip install -e '.[dev]')")
                time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_REGION="us-east-1")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
