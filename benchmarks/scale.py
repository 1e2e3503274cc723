"""Incremental run cost against the size of the lake: one new real shard into lakes of N rows.

Usage: python benchmarks/scale.py [--rows 0 1000000 10000000 | --shards 1000 130000] [--shard-rows 10000]
                                 [--data ../shared/data] [--repeat 3] [--workdir DIR (keeps and reuses the seeded lakes)]

Two kinds of scale: rows (`--rows`, in shards of --shard-rows, DataComp's 10k by default) and
metadata (`--shards N --shard-rows 10`: the mission's 130,000 shards as tiny shards, so the table
count of files, partitions and app transactions is the real one at a fraction of the bytes).

For each size: a lake is seeded with synthetic, fully processed rows (ingested, filtered, captioned,
published) written through the
project's own writers (`Lake.append`, the dedup index, progress records) and left as `recap
maintain` leaves a lake: tables compacted and checkpointed, the dedup index sorted by key with its
sorted runs. Then, in a fresh process, one new real shard
(every COCO pair of ../shared/data/coco-mini-wds, 239 pairs, as one tar) runs stage by stage:
ingest, filter (caption_length, image_size, caption_boilerplate, image_dedup: the corpus filters
look the shard's images up in the lake's dedup index), caption (tiny random LLaVA), validate,
publish, report, and `recap status`. Prints seconds per stage, the ratio to the first size, the peak
RSS of the run's process, and per table of the seeded lake: data files, partitions, app
transactions and the size of its Delta checkpoint. Seeding happens in its own process and is not timed.
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
os.environ.setdefault("RECAP_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _machine import describe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHAIN = {"filters": ["caption_length", "image_size", "caption_boilerplate", "image_dedup"]}
STAGES = ["ingest", "filter", "caption", "validate", "publish", "report", "status"]
TABLE_OPS = ["open pairs", "read 1 shard", "insert 100"]  # timed before the stages, not in the total
WORDS = ("a photo of the red dog running on a sunny beach near blue water with people and tall trees "
         "in the background under clouds").split()


def seed(lake_dir: Path, rows: int, shard_rows: int, chunk_rows: int = 1_000_000) -> None:
    """N synthetic processed rows through the project's writers, `chunk_rows` at a time."""
    import numpy as np
    import pyarrow as pa

    from recap_tasks import progress
    from recap_tasks.config import FilterConfig
    from recap_tasks.filters import dedup_index
    from recap_tasks.lake import Lake
    from recap_tasks.maintenance import maintain
    from recap_tasks.runs import utcnow

    lake = Lake(lake_dir)
    for table in ("pairs", "rejected", "filter_results", "captions", "recap", "quarantine", "progress"):
        lake.ensure(table)
    rng = np.random.default_rng(0)
    now = utcnow()
    words = np.array(WORDS)
    index_parts = []
    for start in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - start)
        idx = np.arange(start, start + n)
        shard = np.char.add("seed/", np.char.zfill((idx // shard_rows).astype(str), 6))
        shard = np.char.add(shard, ".tar")
        uid = np.array([f"{x:032x}" for x in rng.integers(0, 2**62, n) * 4 + idx % 4], dtype=object)
        sha = np.array([f"{a:016x}{b:016x}" * 2 for a, b in zip(rng.integers(0, 2**63, n), rng.integers(0, 2**63, n))],
                       dtype=object)
        phash = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)
        org = [" ".join(words[rng.integers(0, len(words), 8)]) for _ in range(n)]
        re_ = [" ".join(words[rng.integers(0, len(words), 40)]) for _ in range(n)]
        key = np.char.zfill(idx.astype(str), 9)
        base = {"uid": pa.array(uid, pa.string()), "shard_id": pa.array(shard, pa.string())}
        ts = pa.array([now] * n, pa.timestamp("us", tz="UTC"))
        # Row tables through insert_new, as the stages write them (one app transaction per bucket).
        lake.insert_new("pairs", pa.table({**base, "key": key, "url": np.char.add("https://example.com/", key),
                                       "org_caption": org, "sha256": pa.array(sha, pa.string()),
                                       "width": pa.array(np.full(n, 640), pa.int32()),
                                       "height": pa.array(np.full(n, 480), pa.int32()), "image_format": ["JPEG"] * n,
                                       "source_uri": pa.array(np.char.add("/data/", shard), pa.string()),
                                       "source_format": ["wds"] * n, "image_offset": idx * 1024,
                                       "image_size": np.full(n, 1024), "run_id": ["seed"] * n, "ingested_at": ts}))
        lake.insert_new("filter_results", pa.table({**base, "kept": np.ones(n, bool), "phash": phash,
                                                "run_id": ["seed"] * n, "filtered_at": ts}))
        lake.insert_new("captions", pa.table({**base, "re_caption": re_, "model": ["seed-model"] * n,
                                          "prompt": ["p"] * n, "run_id": ["seed"] * n, "captioned_at": ts}))
        lake.append("recap", pa.table({**base, "url": np.char.add("https://example.com/", key), "re_caption": re_,
                                       "org_caption": org, "sha256": pa.array(sha, pa.string()), "key": key,
                                       "re_length": pa.array(np.full(n, 40), pa.int32()),
                                       "org_length": pa.array(np.full(n, 8), pa.int32()),
                                       "model": ["seed-model"] * n, "caption_run_id": ["seed"] * n,
                                       "publish_run_id": ["seed"] * n, "published_at": ts}))
        index_parts.append(dedup_index.entries(pa.table({"uid": base["uid"], "sha256": pa.array(sha, pa.string()),
                                                         "phash": phash}), FilterConfig().max_phash_distance))
        shard_ids = sorted(set(shard.tolist()))
        for stage in progress.STAGES:
            progress.record(lake, stage, shard_ids, run_id="seed")
        print(f"  seeded {start + n:,} rows", file=sys.stderr, flush=True)
    if index_parts:
        from deltalake import WriterProperties

        # Written sorted by key, as `recap maintain` (z-order on key) leaves a maintained index.
        index = pa.concat_tables(index_parts).sort_by([("kind", "ascending"), ("key", "ascending")])
        del index_parts
        lake.append("dedup_index", index, writer_properties=WriterProperties(max_row_group_size=dedup_index.ROW_GROUP))
        del index
        dedup_index.build_runs(lake)  # the sorted runs `recap maintain` writes beside the index
    # As a maintained lake: compacted, checkpointed (what `recap maintain` does on a schedule).
    maintain(lake, tables=[t for t in ("pairs", "rejected", "filter_results", "captions", "recap", "quarantine",
                                       "progress") if lake.exists(t)])


def table_metadata(lake_dir: Path) -> dict:
    """Per table: data files, partitions, app transactions and checkpoint size (the latest one)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    out = {}
    for table in ("pairs", "rejected", "filter_results", "captions", "recap", "quarantine", "progress",
                  "dedup_index"):
        log_dir = lake_dir / table / "_delta_log"
        if not log_dir.is_dir():
            continue
        dt = DeltaTable(str(lake_dir / table))
        actions = pa.table(dt.get_add_actions(flatten=True))
        parts = [c for c in actions.column_names if c.startswith("partition.")]
        checkpoints = sorted(log_dir.glob("*.checkpoint*.parquet"))
        txns = 0
        if checkpoints:
            latest = checkpoints[-1].name.split(".")[0]
            files = [f for f in checkpoints if f.name.startswith(latest)]
            txns = sum(pc.sum(pc.is_valid(pq.read_table(f, columns=["txn"]).column("txn"))).as_py() or 0
                       for f in files)
            size = sum(f.stat().st_size for f in files)
        else:
            size = 0
        out[table] = {"files": actions.num_rows, "partitions": len({tuple(r.values()) for r in
                                                                      actions.select(parts).to_pylist()}) if parts else 1,
                      "app_transactions": txns, "checkpoint_mb": size / 1e6}
    return out


def coco_shard(data: Path, out: Path) -> Path:
    """Every sample of coco-mini-wds as one tar shard (the new data of the incremental run)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as dst:
        for src in sorted((data / "coco-mini-wds").glob("*.tar")):
            with tarfile.open(src) as tf:
                for m in tf.getmembers():
                    if m.isfile():
                        dst.addfile(m, io.BytesIO(tf.extractfile(m).read()))
    return out


def run_once(lake_dir: Path, shard: Path, model: Path, config_file: Path) -> dict:
    """One incremental run of `shard`, stage by stage, in this process."""
    from recap_tasks.stages.caption import run_caption
    from recap_tasks.config import RecapConfig
    from recap_tasks.stages.filter import run_filter
    from recap_tasks.stages.ingest import ingest
    from recap_tasks.lake import Lake
    from recap_tasks.stages.publish import run_publish
    from recap_tasks.stages.report import build_report
    from recap_tasks.status import lake_status
    from recap_tasks.stages.validate import run_validate

    config = RecapConfig.load(config_file)
    out: dict = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        value = fn()
        out[name] = time.perf_counter() - t0
        return value

    # The table-level costs the issue measured: open `pairs`, read one shard, insert 100 rows of a new shard.
    import pyarrow as pa
    from deltalake import DeltaTable

    timed("open pairs", lambda: DeltaTable(str(lake_dir / "pairs")).version())
    lake = Lake(lake_dir)
    timed("read 1 shard", lambda: lake.read("pairs", shards=["seed/000000.tar"]))
    new_rows = pa.table({"uid": [f"probe{i:027d}" for i in range(100)], "shard_id": ["probe/000000.tar"] * 100,
                         "key": [f"{i:09d}" for i in range(100)]})
    timed("insert 100", lambda: lake.insert_new("pairs", new_rows))
    lake.delete("pairs", ["probe/000000.tar"], "uid LIKE 'probe%'")

    timed("ingest", lambda: ingest([str(shard)], lake, config=config.ingest, run_id="bench"))
    f = timed("filter", lambda: run_filter(lake, config=config.filter, run_id="bench"))
    c = timed("caption", lambda: run_caption(lake, model=str(model), config=config.caption, run_id="bench"))
    v = timed("validate", lambda: run_validate(lake, config=config.validate, run_id="bench", raise_on_failure=False))
    p = timed("publish", lambda: run_publish(lake, batch_id="bench", run_id="bench"))
    timed("report", lambda: build_report(lake, run_id="bench"))
    status = timed("status", lambda: lake_status(lake))
    out["rows"] = {"filtered": f.rows_in, "kept": f.kept, "captioned": c.captioned, "validated": v.batch.rows,
                   "published": p.inserted, "lake_published": status["published"], "balanced": status["balanced"]}
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[0, 1_000_000, 10_000_000])
    parser.add_argument("--shards", type=int, nargs="+", help="seed by shard count (rows = shards x --shard-rows)")
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, help="keep seeded lakes here and reuse them (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per lake size; each stage's best is kept")
    parser.add_argument("--_seed", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_run", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._seed:
        seed(Path(args._seed[0]), int(args._seed[1]), args.shard_rows)
        return
    if args._run:
        print(json.dumps(run_once(*map(Path, args._run))))
        return
    if args.shards:
        args.rows = [n * args.shard_rows for n in args.shards]
    if not (args.data / "coco-mini-wds").is_dir():
        sys.exit(f"scale.py: no {args.data}/coco-mini-wds; pass --data DIR (the shared data folder)")
    from recap_tasks.captioning.tiny_model import make_test_model

    with contextlib.ExitStack() as stack:
        # Seeded lakes are kept in --workdir (and reused by later runs); a temporary folder otherwise.
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        model = make_test_model(work / "tiny-llava")
        chain = work / "chain.yaml"
        chain.write_text(json.dumps(CHAIN))
        config = work / "config.yaml"
        config.write_text(json.dumps({"filter": {"chain": str(chain), "executor": "local"},
                                      "caption": {"batch_size": 16}, "validate": {"require_english": False}}))
        shard = coco_shard(args.data, work / "new" / "coco-all.tar")
        print(f"machine: {describe()}")
        print(f"new shard: {shard.name}, lake shards of {args.shard_rows:,} rows, best of {args.repeat} per N; "
              f"shards per N: {', '.join(f'{n // args.shard_rows:,}' for n in args.rows)}")
        results = {}
        for n in args.rows:
            seeded = work / f"seed-{n}-{args.shard_rows}"
            if not (seeded / ".seeded").exists():
                shutil.rmtree(seeded, ignore_errors=True)
                t0 = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--shard-rows", str(args.shard_rows), "--_seed",
                                str(seeded), str(n)], check=True)
                (seeded / ".seeded").write_text(f"{n} rows\n")
                print(f"  N={n:,}: seeded in {time.perf_counter() - t0:.0f} s", flush=True)
            meta = table_metadata(seeded)
            for table, m in meta.items():
                print(f"  N={n:,} {table:<15} files {m['files']:>6,}  partitions {m['partitions']:>6,}  app "
                      f"transactions {m['app_transactions']:>6,}  checkpoint {m['checkpoint_mb']:.2f} MB", flush=True)
            runs = []
            for _ in range(args.repeat):
                lake = work / f"run-{n}"
                shutil.rmtree(lake, ignore_errors=True)
                # Each run starts from the same seeded lake: hard links, not copies (Delta data and log
                # files are never modified in place; writers add files or replace them by rename).
                shutil.copytree(seeded, lake, symlinks=True, copy_function=os.link)
                proc = subprocess.run([sys.executable, __file__, "--_run", str(lake), str(shard), str(model),
                                       str(config)], check=True, capture_output=True, text=True)
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                shutil.rmtree(lake, ignore_errors=True)
            # Best of the repeats per stage (these machines are shared); the largest peak RSS.
            results[n] = {**{s: min(r[s] for r in runs) for s in STAGES + TABLE_OPS}, "rows": runs[-1]["rows"],
                          "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}
            print(f"  N={n:,}: rows {results[n]['rows']}", flush=True)
            if not args.workdir:
                shutil.rmtree(seeded, ignore_errors=True)
        base = results[args.rows[0]]
        header = f"{'stage':<12}" + "".join(f"{f'N={n:,}':>14}" for n in args.rows) + \
            "".join(f"{f'x N={n:,}':>16}" for n in args.rows[1:])
        print(header)
        for stage in TABLE_OPS + STAGES:
            line = f"{stage:<12}" + "".join(f"{results[n][stage]:>13.3f}s" for n in args.rows)
            line += "".join(f"{results[n][stage] / base[stage]:>15.2f}x" for n in args.rows[1:])
            print(line)
        total = {n: sum(results[n][s] for s in STAGES) for n in args.rows}
        print(f"{'total':<12}" + "".join(f"{total[n]:>13.2f}s" for n in args.rows)
              + "".join(f"{total[n] / total[args.rows[0]]:>15.2f}x" for n in args.rows[1:]))
        print(f"{'peak RSS':<12}" + "".join(f"{results[n]['peak_rss_mib']:>10.0f} MiB" for n in args.rows)
              + "".join(f"{results[n]['peak_rss_mib'] / base['peak_rss_mib']:>15.2f}x" for n in args.rows[1:]))


if __name__ == "__main__":
    main()
