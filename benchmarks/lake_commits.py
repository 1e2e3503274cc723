"""Table metadata between maintains: a lake written by many commits against one written by one.

Usage: python benchmarks/lake_commits.py [--lakes 1000:1 1000:1:checkpointed 1000:65 130000:65]
                                         [--shard-rows 10] [--repeat 3]
                                         [--workdir DIR (keeps and reuses the seeded lakes)]

Each lake `SHARDS:COMMITS[:checkpointed]` is seeded with SHARDS tiny shards of --shard-rows rows written to `pairs`
in COMMITS commits through the stages' own writer (`Lake.insert_new`: its bucket app transactions,
its small-file folds, the table's own checkpoints every `delta.checkpointInterval` commits), and
never maintained: no `recap maintain`, no explicit checkpoint. The mission's 130,000 shards in 65
commits of 2,000 is what a lake looks like between two scheduled maintains; tiny shards give it the
real number of commits, files, partitions and app transactions at a fraction of the bytes.
`:checkpointed` adds one explicit checkpoint after seeding (as the issue's probe had its 1,000-shard
lake): a table past its first 10 commits always opens from a checkpoint, and reading one costs more
than reading two small JSON commits, so it is the like-for-like baseline. `1000:65` is a 1,000-shard
lake with the same history as the 130,000-shard one: the ratio to it is what the shard count alone
costs.

Then, --repeat times, a fresh process on a hard-linked copy times opening `pairs` (the snapshot a
stage starts from) and `insert_new` of 100 rows of a new shard (one commit, as a stage makes); the
best of the repeats is kept. Prints per lake: data files, commits since the latest checkpoint,
checkpoint size, and the two timings with their ratio to the first lake. Seeding is not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RECAP_QUIET", "1")

from _machine import describe  # noqa: E402

OPS = ["open pairs", "insert 100"]


def seed(lake_dir: Path, shards: int, commits: int, shard_rows: int, checkpointed: bool = False) -> None:
    import numpy as np
    import pyarrow as pa

    from recap_tasks.lake import Lake

    lake = Lake(lake_dir)
    bounds = np.linspace(0, shards, commits + 1).astype(int)
    t0 = time.perf_counter()
    for c in range(commits):
        idx = np.arange(bounds[c] * shard_rows, bounds[c + 1] * shard_rows)
        shard = np.char.add(np.char.add("seed/", np.char.zfill((idx // shard_rows).astype(str), 6)), ".tar")
        key = np.char.zfill(idx.astype(str), 9)
        lake.insert_new("pairs", pa.table({
            "uid": pa.array([f"{x:032x}" for x in idx], pa.string()), "shard_id": pa.array(shard, pa.string()),
            "key": pa.array(key, pa.string()), "url": pa.array(np.char.add("https://example.com/", key), pa.string()),
            "org_caption": ["a photo of the red dog running on a sunny beach"] * len(idx),
            "sha256": pa.array([f"{x:064x}" for x in idx], pa.string()),
            "width": pa.array(np.full(len(idx), 640), pa.int32()), "height": pa.array(np.full(len(idx), 480), pa.int32()),
            "source_uri": pa.array(np.char.add("/data/", shard), pa.string()), "source_format": ["wds"] * len(idx),
            "image_offset": idx * 1024, "image_size": np.full(len(idx), 1024), "run_id": ["seed"] * len(idx)}))
        if (c + 1) % 10 == 0 or c + 1 == commits:
            print(f"    {c + 1}/{commits} commits, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if checkpointed:
        lake.delta("pairs").create_checkpoint()


def parse_lake(spec: str, parser: argparse.ArgumentParser) -> tuple[int, int, bool]:
    parts = spec.split(":")
    try:
        shards, commits = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        parser.error(f"--lakes {spec!r}: want SHARDS:COMMITS[:checkpointed], e.g. 130000:65")
    if len(parts) > 3 or (len(parts) == 3 and parts[2] != "checkpointed") or not 0 < commits <= shards:
        parser.error(f"--lakes {spec!r}: want SHARDS:COMMITS[:checkpointed] with 0 < COMMITS <= SHARDS")
    return shards, commits, len(parts) == 3


def metadata(lake_dir: Path) -> dict:
    from deltalake import DeltaTable

    log_dir = lake_dir / "pairs" / "_delta_log"
    dt = DeltaTable(str(lake_dir / "pairs"))
    last = json.loads((log_dir / "_last_checkpoint").read_text()) if (log_dir / "_last_checkpoint").exists() else {}
    checkpoint = sum(f.stat().st_size for f in log_dir.glob(f"{last['version']:020d}.checkpoint*.parquet")) if last else 0
    return {"files": len(dt.file_uris()), "version": dt.version(), "checkpoint_version": last.get("version"),
            "commits_after_checkpoint": dt.version() - last.get("version", -1), "checkpoint_mb": checkpoint / 1e6}


def run_once(lake_dir: Path) -> dict:
    import pyarrow as pa
    from deltalake import DeltaTable

    from recap_tasks.lake import Lake

    out = {}
    t0 = time.perf_counter()
    DeltaTable(str(lake_dir / "pairs")).version()
    out["open pairs"] = time.perf_counter() - t0
    rows = pa.table({"uid": [f"probe{i:027d}" for i in range(100)], "shard_id": ["probe/000000.tar"] * 100,
                     "key": [f"{i:09d}" for i in range(100)]})
    lake = Lake(lake_dir)
    t0 = time.perf_counter()
    assert lake.insert_new("pairs", rows) == 100
    out["insert 100"] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lakes", nargs="+", default=["1000:1", "1000:1:checkpointed", "1000:65", "130000:65"],
                        help="SHARDS:COMMITS[:checkpointed] per lake; ratios are to the first two")
    parser.add_argument("--shard-rows", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--_seed", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--_run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._seed:
        seed(Path(args._seed[0]), int(args._seed[1]), int(args._seed[2]), args.shard_rows, args._seed[3] == "1")
        return
    if args._run:
        print(json.dumps(run_once(Path(args._run))))
        return
    lakes = [parse_lake(spec, parser) for spec in args.lakes]
    print(f"machine: {describe()}")
    print(f"pairs seeded through Lake.insert_new, shards of {args.shard_rows} rows, never maintained; "
          f"best of {args.repeat} fresh processes per lake")
    results = {}
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        for shards, commits, checkpointed in lakes:
            seeded = work / f"commits-{shards}-{commits}-{args.shard_rows}{'-ckpt' if checkpointed else ''}"
            if not (seeded / ".seeded").exists():
                shutil.rmtree(seeded, ignore_errors=True)
                t0 = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--shard-rows", str(args.shard_rows), "--_seed", str(seeded),
                                str(shards), str(commits), str(int(checkpointed))], check=True)
                (seeded / ".seeded").write_text(f"{shards} shards in {commits} commits\n")
                print(f"  {shards:,} shards in {commits} commits: seeded in {time.perf_counter() - t0:.0f} s", flush=True)
            meta = metadata(seeded)
            runs = []
            for _ in range(args.repeat):
                lake = work / "run"
                shutil.rmtree(lake, ignore_errors=True)
                shutil.copytree(seeded, lake, symlinks=True, copy_function=os.link)
                proc = subprocess.run([sys.executable, __file__, "--_run", str(lake)], check=True, capture_output=True,
                                      text=True)
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                shutil.rmtree(lake, ignore_errors=True)
            results[(shards, commits, checkpointed)] = {**meta, **{op: min(r[op] for r in runs) for op in OPS}}
        bases = [results[lake] for lake in lakes[:2]]
        print(f"{'lake':<38}{'files':>7}{'version':>8}{'after ckpt':>11}{'ckpt MB':>8}"
              + "".join(f"{op:>12}" + "".join(f"{f'x{i + 1}':>7}" for i in range(len(bases))) for op in OPS))
        for (shards, commits, checkpointed), r in results.items():
            name = f"{shards:,} shards / {commits} commits" + (", checkpointed" if checkpointed else "")
            print(f"{name:<38}{r['files']:>7,}{r['version']:>8}{r['commits_after_checkpoint']:>11}"
                  f"{r['checkpoint_mb']:>8.2f}"
                  + "".join(f"{r[op]:>11.3f}s" + "".join(f"{r[op] / b[op]:>6.2f}x" for b in bases) for op in OPS))
        print("x1, x2: ratio to the first and to the second lake listed")


if __name__ == "__main__":
    main()
