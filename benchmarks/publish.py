"""Publishing and validation throughput at 100k and 1M rows (synthetic rows, real Delta and GX).

Usage: python benchmarks/publish.py [--sizes 100000 1000000]

Per size N, into a fresh local Delta table:
  - merge-insert: MERGE N new rows by uid into an empty-but-existing table;
  - merge-upsert: MERGE N rows again, half of them new uids, half re-captioned (updated);
  - merge-noop: MERGE the same N rows again (every row matched, nothing changes);
  - hygiene flags: refusal / prompt-echo / repetition flags computed in Python (rows captioned
    before the caption stage stored them);
  - validate: the GX suite over N rows (language id off; GX imported beforehand), then the
    fastText language id alone (on at most 100k rows).
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
from recap_tasks.config import ValidateConfig  # noqa: E402
from recap_tasks.lake import Lake, _conform  # noqa: E402
from recap_tasks.validate import check_frame, english_scores, row_checks  # noqa: E402

WORDS = ("a the dog cat man woman red blue green sitting standing near table street park tree water sky "
         "building car bus photo white black small large wooden with of on in and next to").split()


def rows(n: int, seed: int, uid_offset: int = 0, caption_seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed + caption_seed)
    lengths = rng.integers(30, 70, n)
    vocab = np.array(WORDS)
    captions = [" ".join(vocab[rng.integers(0, len(vocab), k)]) for k in lengths]
    uids = [f"{i + uid_offset:032x}" for i in range(n)]
    return _conform(pa.table({
        "uid": uids, "key": [f"{i:09d}" for i in range(n)], "url": [f"https://example.com/{i}.jpg" for i in range(n)],
        "re_caption": captions, "org_caption": ["a photo of something"] * n, "sha256": ["ab" * 32] * n,
        "re_length": pa.array(lengths, pa.int32()), "org_length": pa.array(np.full(n, 4), pa.int32()),
        "re_clip_score": pa.array(rng.normal(0.31, 0.03, n), pa.float32()),
        "org_clip_score": pa.array(rng.normal(0.29, 0.03, n), pa.float32()),
        "shard_id": [f"bench/{i // 10000:05d}.tar" for i in range(n)], "model": ["bench-model"] * n,
        "prompt": ["p"] * n,
    }), schemas.RECAP)


def merge(lake: Lake, data: pa.Table) -> dict:
    return (lake.delta("recap").merge(data, predicate="t.uid = s.uid", source_alias="s", target_alias="t")
            .when_matched_update_all(predicate="t.re_caption <> s.re_caption OR t.model <> s.model")
            .when_not_matched_insert_all().execute())


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    import great_expectations  # noqa: F401  (import time is not validation time)

    print(f"machine: {describe()}")
    print(f"{'rows':>9} {'operation':<16} {'seconds':>8} {'rows/s':>10}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            lake = Lake(Path(tmp) / "lake")
            lake.write_delta("recap", rows(0, 0))
            first = rows(n, 1)
            _, t = timed(merge, lake, first)
            print(f"{n:>9} {'merge-insert':<16} {t:>8.2f} {n / t:>10.0f}")
            half = n // 2
            upsert = pa.concat_tables([rows(half, 1, caption_seed=7), rows(n - half, 2, uid_offset=n)])
            m, t = timed(merge, lake, upsert)
            assert m["num_target_rows_inserted"] == n - half and m["num_target_rows_updated"] == half, m
            print(f"{n:>9} {'merge-upsert':<16} {t:>8.2f} {n / t:>10.0f}")
            m, t = timed(merge, lake, upsert)
            assert m["num_target_rows_inserted"] == 0 and m["num_target_rows_updated"] == 0, m
            print(f"{n:>9} {'merge-noop':<16} {t:>8.2f} {n / t:>10.0f}")
            df = first.to_pandas().assign(is_refusal=None, prompt_echo=None, distinct_ngram_ratio=None)
            config = ValidateConfig(require_english=False)
            frame, t = timed(row_checks, df, config)
            print(f"{n:>9} {'hygiene flags':<16} {t:>8.2f} {n / t:>10.0f}")
            (results, quarantine, _), t = timed(check_frame, frame, config)
            assert len(results) > 10
            print(f"{n:>9} {'validate (GX)':<16} {t:>8.2f} {n / t:>10.0f}")
            sample = df["re_caption"].tolist()[: min(n, 100_000)]
            _, t = timed(english_scores, sample)
            print(f"{len(sample):>9} {'language id':<16} {t:>8.2f} {len(sample) / t:>10.0f}")


if __name__ == "__main__":
    main()
