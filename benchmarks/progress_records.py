"""Per-shard progress records between maintains: folded against not folded.

Usage: python benchmarks/progress_records.py [--records 300 2000] [--last 50]

Stages append one progress record per shard as they finish it (`progress.record` -> `Lake.append`),
one commit each. For each N in --records, a fresh lake takes N such appends to the `ingest` stage
through the product's own `Lake.append` (its folds on, as shipped, and off: FOLD_AT set out of
reach, the behaviour before `Lake.fold_records`). Prints per N and mode: the stage's data files,
the table version, the mean time of the last --last appends (what the N-th shard's record costs),
and `progress.latest` and `progress.pending_shards("filter")` (what every stage's planning reads).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RECAP_QUIET", "1")

from _machine import describe  # noqa: E402


def measure(n: int, last: int, fold: bool) -> dict:
    import pyarrow as pa

    from recap_tasks import lake as lake_module
    from recap_tasks import progress, schemas
    from recap_tasks.lake import PROGRESS, Lake
    from recap_tasks.runs import utcnow

    lake_module.FOLD_AT = 4 if fold else 10**9
    with tempfile.TemporaryDirectory() as d:
        lake = Lake(d)
        times = []
        for i in range(n):
            row = {"shard_id": f"bench/{i:06d}.tar", "stage": "ingest", "rows_in": 10_000, "rows_out": 9_990,
                   "rejected": 10, "reasons": '{"decode": 10}', "source_uri": f"/data/bench/{i:06d}.tar",
                   "size": 400_000_000, "mtime_ns": 1_700_000_000_000_000_000, "run_id": "bench",
                   "recorded_at": utcnow()}
            t0 = time.perf_counter()
            lake.append(PROGRESS, pa.Table.from_pylist([row], schema=schemas.PROGRESS.arrow))
            times.append(time.perf_counter() - t0)
            if (i + 1) % 500 == 0:
                print(f"    {'folded' if fold else 'not folded'}: {i + 1}/{n} records", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        latest = progress.latest(lake)
        t_latest = time.perf_counter() - t0
        t0 = time.perf_counter()
        pending = progress.pending_shards(lake, "filter")
        t_pending = time.perf_counter() - t0
        assert latest.num_rows == n and len(pending) == n, (latest.num_rows, len(pending))
        return {"files": len(lake.delta(PROGRESS).file_uris()), "version": lake.version(PROGRESS),
                "append": sum(times[-last:]) / len(times[-last:]), "latest": t_latest, "pending": t_pending}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", nargs="+", type=int, default=[300, 2000])
    parser.add_argument("--last", type=int, default=50)
    args = parser.parse_args()
    print(f"machine: {describe()}")
    print(f"progress records appended one per commit through Lake.append; append = mean of the last {args.last}")
    print(f"{'records':>8} {'mode':<11}{'files':>7}{'version':>9}{'append':>10}{'latest':>10}{'pending':>10}")
    for n in args.records:
        for fold in (True, False):
            r = measure(n, args.last, fold)
            print(f"{n:>8,} {'folded' if fold else 'not folded':<11}{r['files']:>7,}{r['version']:>9,}"
                  f"{r['append']:>9.3f}s{r['latest']:>9.3f}s{r['pending']:>9.3f}s", flush=True)


if __name__ == "__main__":
    main()
