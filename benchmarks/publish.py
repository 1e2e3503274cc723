"""Publishing and validation throughput (synthetic rows, the product's publish, real Delta and GX).

Usage: python benchmarks/publish.py [--sizes 10000 100000] [--shard-rows 10000]

Per size N, into a fresh lake whose `pairs` and `captions` hold N captioned rows in shards of
`--shard-rows`, written through the stages' own writer (`Lake.insert_new`), each figure times
`recap_tasks.stages.publish.run_publish` on a validated batch record (what `recap publish` runs):
  - publish-new: a batch of N rows, none published yet (the append path);
  - publish-repeat: the same batch again (recorded in the table's app transactions: a no-op);
  - publish-noop: another batch of the same N rows, unchanged (reads the shards' published rows,
    writes nothing);
  - publish-upsert: a batch of N rows on the same shards, half of them new uids, half published
    uids re-captioned since (the shards' rows are overwritten: the replace path);
then, on the N rows: hygiene flags (refusal / prompt-echo / repetition computed in Python, for
rows captioned before the caption stage stored them); the GX suite (language id off; GX
imported beforehand); the fastText language id alone (on at most 100k rows).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RECAP_QUIET", "1")

from _machine import describe  # noqa: E402

from recap_tasks import schemas  # noqa: E402
from recap_tasks.batches import Batch, write_uids  # noqa: E402
from recap_tasks.config import ValidateConfig  # noqa: E402
from recap_tasks.filters.language import english_scorer  # noqa: E402
from recap_tasks.lake import Lake, conform  # noqa: E402
from recap_tasks.stages.publish import run_publish  # noqa: E402
from recap_tasks.stages.validate import check_frame, row_checks  # noqa: E402

WORDS = ("a the dog cat man woman red blue green sitting standing near table street park tree water sky "
         "building car bus photo white black small large wooden with of on in and next to").split()


def rows(n: int, seed: int, uid_offset: int = 0, shard_rows: int = 10_000) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(30, 70, n)
    vocab = np.array(WORDS)
    captions = [" ".join(vocab[rng.integers(0, len(vocab), k)]) for k in lengths]
    uids = [f"{i + uid_offset:032x}" for i in range(n)]
    return conform(pa.table({
        "uid": uids, "key": [f"{i:09d}" for i in range(n)], "url": [f"https://example.com/{i}.jpg" for i in range(n)],
        "re_caption": captions, "org_caption": ["a photo of something"] * n, "sha256": ["ab" * 32] * n,
        "re_length": pa.array(lengths, pa.int32()), "org_length": pa.array(np.full(n, 4), pa.int32()),
        "re_clip_score": pa.array(rng.normal(0.31, 0.03, n), pa.float32()),
        "org_clip_score": pa.array(rng.normal(0.29, 0.03, n), pa.float32()),
        "shard_id": [f"bench/{i // shard_rows:05d}.tar" for i in range(n)], "model": ["bench-model"] * n,
        "prompt": ["p"] * n,
    }), schemas.RECAP)


def seed(lake: Lake, data: pa.Table) -> None:
    """`data`'s rows as ingest and caption write them: `pairs` and `captions` through insert_new."""
    from recap_tasks.runs import utcnow

    n = data.num_rows
    ts = pa.array([utcnow()] * n, pa.timestamp("us", tz="UTC"))
    lake.insert_new("pairs", pa.table({
        "uid": data["uid"], "shard_id": data["shard_id"], "key": data["key"], "url": data["url"],
        "org_caption": data["org_caption"], "sha256": data["sha256"],
        "width": pa.array(np.full(n, 640), pa.int32()), "height": pa.array(np.full(n, 480), pa.int32()),
        "image_format": ["JPEG"] * n, "source_uri": data["shard_id"], "source_format": ["wds"] * n,
        "image_offset": np.arange(n) * 1024, "image_size": np.full(n, 1024), "run_id": ["bench"] * n,
        "ingested_at": ts}))
    lake.insert_new("captions", pa.table({
        "uid": data["uid"], "shard_id": data["shard_id"], "re_caption": data["re_caption"], "model": data["model"],
        "prompt": data["prompt"], "re_clip_score": data["re_clip_score"],
        "org_clip_score": data["org_clip_score"], "run_id": ["bench"] * n, "captioned_at": ts}))


def batch(lake: Lake, batch_id: str, data: pa.Table) -> str:
    """A validated (passing) batch record of `data`'s uids, as validate leaves it."""
    record = Batch(batch_id=batch_id, rows=data.num_rows, success=True, validated_at=batch_id,
                   shards=sorted(set(data.column("shard_id").to_pylist())))
    write_uids(lake, record, data.column("uid").combine_chunks())
    record.save(lake)
    return batch_id


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--shard-rows", type=int, default=10_000)
    args = parser.parse_args()
    import great_expectations  # noqa: F401  (import time is not validation time)

    print(f"machine: {describe()}")
    print(f"{'rows':>9} {'operation':<16} {'seconds':>8} {'rows/s':>10}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            lake = Lake(Path(tmp) / "lake")
            first = rows(n, 1, shard_rows=args.shard_rows)
            seed(lake, first)
            r, t = timed(run_publish, lake, batch_id=batch(lake, "b1", first))
            assert (r.inserted, r.updated) == (n, 0), r
            print(f"{n:>9} {'publish-new':<16} {t:>8.2f} {n / t:>10.0f}")
            r, t = timed(run_publish, lake, batch_id="b1")
            assert r.already_published, r
            print(f"{n:>9} {'publish-repeat':<16} {t:>8.2f} {n / t:>10.0f}")
            r, t = timed(run_publish, lake, batch_id=batch(lake, "b2", first))
            assert (r.inserted, r.updated) == (0, 0), r
            print(f"{n:>9} {'publish-noop':<16} {t:>8.2f} {n / t:>10.0f}")
            # Half the published uids re-captioned (a new caption in `captions`), and as many new uids
            # on the same shards (ingested and captioned since): one batch of both.
            half = n // 2
            recaptioned = first.slice(0, half)
            lake.delta("captions").update(updates={"re_caption": "concat(re_caption, ' again')"},
                                          predicate=f"uid < '{half:032x}'")
            fresh = rows(n - half, 2, uid_offset=n, shard_rows=args.shard_rows)
            fresh = fresh.set_column(fresh.schema.get_field_index("shard_id"), "shard_id",
                                     first.column("shard_id").take(np.arange(n - half) * 2 % n))
            seed(lake, fresh)
            upsert = pa.concat_tables([recaptioned, fresh])
            r, t = timed(run_publish, lake, batch_id=batch(lake, "b3", upsert))
            assert (r.inserted, r.updated) == (n - half, half), r
            assert lake.read("recap", ["uid"]).num_rows == n + n - half
            print(f"{n:>9} {'publish-upsert':<16} {t:>8.2f} {n / t:>10.0f}")
            df = first.to_pandas().assign(is_refusal=None, prompt_echo=None, distinct_ngram_ratio=None)
            config = ValidateConfig(require_english=False)
            frame, t = timed(row_checks, df, config)
            print(f"{n:>9} {'hygiene flags':<16} {t:>8.2f} {n / t:>10.0f}")
            (results, quarantine, _), t = timed(check_frame, frame, config)
            assert len(results) > 10
            print(f"{n:>9} {'validate (GX)':<16} {t:>8.2f} {n / t:>10.0f}")
            sample = df["re_caption"].tolist()[: min(n, 100_000)]
            _, t = timed(english_scorer().english_scores, sample)
            print(f"{len(sample):>9} {'language id':<16} {t:>8.2f} {len(sample) / t:>10.0f}")


if __name__ == "__main__":
    main()
