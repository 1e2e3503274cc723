"""Download throughput (images/s) against a local HTTP server, with 1 and 2 worker processes.

Usage: python benchmarks/download.py [--images 4000] [--threads 16] [--repeats 3] [--data ../shared/data]

The server (tests/http_server.py, a threaded http.server in its own process on 127.0.0.1) serves
the real COCO photos of ../shared/data/coco-mini-wds (333-640 px JPEGs, ~100 KB) under distinct
URLs, or generated 320x240 JPEGs when that folder is absent. Each run downloads `--images` URLs
into four fresh shards (tar + parquet + stats), sha256 checked against the metadata. Server and
downloader share the machine's cores, so the figures are a floor for the downloader alone.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RECAP_QUIET", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from _machine import describe  # noqa: E402

from recap_tasks.config import DownloadConfig  # noqa: E402
from recap_tasks.stages.download import download  # noqa: E402


def load_photos(data: Path) -> list[bytes]:
    photos = []
    for tar in sorted((data / "coco-mini-wds").glob("*.tar")):
        with tarfile.open(tar) as tf:
            photos += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    if photos:
        return photos
    from tests.helpers import jpeg

    return [jpeg(320, 240, (i * 7 % 255, 90, 160)) for i in range(64)]


def serve(data: str, images: int, queue) -> None:
    from tests.http_server import ImageServer

    photos = load_photos(Path(data))
    with ImageServer({f"{i}.jpg": photos[i % len(photos)] for i in range(images)}) as server:
        queue.put(server.base)
        while True:
            time.sleep(3600)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process and its finished children, or of process `pid`."""
    if pid is None:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=16, help="concurrent fetches per worker process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    photos = load_photos(Path(args.data))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    server = ctx.Process(target=serve, args=(args.data, args.images, queue), daemon=True)
    server.start()
    try:
        base = queue.get(timeout=120)
        with tempfile.TemporaryDirectory() as tmp:
            meta = Path(tmp) / "meta.parquet"
            pq.write_table(pa.table({
                "uid": [f"{i:032x}" for i in range(args.images)],
                "url": [f"{base}/img/{i}.jpg" for i in range(args.images)],
                "text": [f"photo number {i}" for i in range(args.images)],
                "sha256": [hashlib.sha256(photos[i % len(photos)]).hexdigest() for i in range(args.images)]}), meta)
            mean_kb = statistics.mean(len(p) for p in photos) / 1024
            print(f"machine: {describe()}")
            print(f"images: {args.images} URLs of {len(photos)} distinct JPEGs (mean {mean_kb:.0f} KB), "
                  f"{args.threads} threads per process, 4 shards of {max(1, args.images // 4)}")
            print(f"{'processes':>9} {'images/s (median)':>18} {'runs':>24} {'downloader CPU ms/image':>24} "
                  f"{'server CPU ms/image':>20}")
            for processes in (1, 2):
                config = DownloadConfig(allow_private_networks=True, processes=processes, threads=args.threads,
                                        per_host_connections=args.threads,
                                        samples_per_shard=max(1, args.images // 4))
                rates, cpu, server_cpu = [], [], []
                for r in range(args.repeats):
                    out = Path(tmp) / f"out-{processes}-{r}"
                    c0, s0 = cpu_seconds(), cpu_seconds(server.pid)
                    t0 = time.perf_counter()
                    summary = download([str(meta)], out, config=config).summary()
                    seconds = time.perf_counter() - t0
                    if summary["successes"] != args.images:
                        sys.exit(f"only {summary['successes']} of {args.images} downloaded: {summary['reasons']}")
                    rates.append(args.images / seconds)
                    cpu.append((cpu_seconds() - c0) / args.images * 1000)
                    server_cpu.append((cpu_seconds(server.pid) - s0) / args.images * 1000)
                print(f"{processes:>9} {statistics.median(rates):>18.0f} {str([round(x) for x in rates]):>24} "
                      f"{statistics.median(cpu):>24.2f} {statistics.median(server_cpu):>20.2f}")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
