"""Per-shard progress records: what each stage holds for each shard, as a small table.

When a stage finishes a shard it appends one record to the `progress` table: the shard's absolute
counts at that stage (rows in, rows out, rejected per reason), recomputed from the shard's own
partitions. The latest record per (shard, stage) wins, so a rerun after a crash simply records
again. "Which shards are pending for stage X", `recap status`, the report funnel and the Airflow
planner sum these records; none of them reads the row tables. (datatrove's completion markers and
img2dataset's `_stats.json` are the model.)

| stage    | rows_in                      | rows_out           | rejected                     |
|----------|------------------------------|--------------------|------------------------------|
| download | metadata rows of the shard   | samples in the tar | download failures            |
| ingest   | samples read from the source | pairs              | ingest rejections            |
| filter   | pairs with a verdict         | kept               | dropped by the filter        |
| caption  | kept pairs settled           | captioned          | caption rejections           |
| publish  | captioned pairs settled      | published          | quarantined                  |

`download` exists only for shards a downloader wrote (`recap download`, img2dataset: a parquet
with per-row `status` beside the tar); ingest records it when it reads the shard.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import faults, schemas
from recap_tasks import stages as stage_order
from recap_tasks.errors import RecapError
from recap_tasks.lake import PROGRESS, Lake
from recap_tasks.runs import utcnow

# The stages that keep records, and whose output each consumes (declared in recap_tasks.stages): a
# shard is pending for `stage` while its upstream stage's rows_out exceeds this stage's rows_in.
STAGES = stage_order.RECORDED
UPSTREAM = stage_order.UPSTREAM

_COUNTS = ["shard_id", "stage", "rows_in", "rows_out", "rejected", "reasons", "truncated", "size", "mtime_ns",
           "source_uri", "detail", "run_id", "recorded_at"]


def latest(lake: Lake, *, shard_ids: Iterable[str] | None = None, stages: Iterable[str] = STAGES) -> pa.Table:
    """The latest record per (shard, stage), for the given shards (default: all) and stages."""
    stages = list(stages)
    pruning = [("stage", "in", stages)] if set(stages) != set(STAGES) else None
    where = pc.field("stage").isin(stages)
    if shard_ids is not None:
        where = where & pc.field("shard_id").isin(sorted(set(shard_ids)))
    records = lake.read(PROGRESS, _COUNTS, where=where, partitions=pruning)
    if records.num_rows == 0:
        return records
    records = records.sort_by([("shard_id", "ascending"), ("stage", "ascending"), ("recorded_at", "ascending")])
    shard = records.column("shard_id").to_numpy(zero_copy_only=False)
    stage = records.column("stage").to_numpy(zero_copy_only=False)
    last = np.ones(records.num_rows, dtype=bool)
    last[:-1] = (shard[1:] != shard[:-1]) | (stage[1:] != stage[:-1])
    return records.filter(pa.array(last))


def by_shard(lake: Lake, *, shard_ids: Iterable[str] | None = None,
             stages: Iterable[str] = STAGES) -> dict[str, dict[str, dict]]:
    """{shard id: {stage: record}} of the latest records."""
    out: dict[str, dict[str, dict]] = {}
    for r in latest(lake, shard_ids=shard_ids, stages=stages).to_pylist():
        out.setdefault(r["shard_id"], {})[r["stage"]] = r
    return out


def pending_shards(lake: Lake, stage: str, *, shard_ids: Iterable[str] | None = None) -> list[str]:
    """Shards whose upstream stage has rows this stage has not settled yet (sorted).

    Vectorised over the records (no Python object per shard): 0.4-0.9 s at 130,000 shards here."""
    up = UPSTREAM[stage]
    records = latest(lake, shard_ids=shard_ids, stages=(up, stage))
    ids = pc.unique(records.column("shard_id").combine_chunks())
    have, done = per_shard_counts(records, ids, up, "rows_out"), per_shard_counts(records, ids, stage, "rows_in")
    return sorted(ids.filter(pa.array(have > done)).to_pylist())


def require_known(lake: Lake, shard_ids: Iterable[str]) -> None:
    """Shards named on purpose (`--shard`, a mapped task) must be in the lake: one clear error for a
    typo or a shard never ingested, instead of a stage that silently does nothing."""
    wanted = sorted(set(shard_ids))
    known = set(latest(lake, shard_ids=wanted, stages=("ingest",)).column("shard_id").to_pylist())
    unknown = [s for s in wanted if s not in known]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise RecapError(f"no shard {unknown[0]!r}{more} in {lake.uri}: shard ids are <folder>/<file> as ingested; "
                         f"`recap status --json` lists them, `recap ingest` adds new ones")


def per_shard_counts(records: pa.Table, ids: pa.Array, stage: str, column: str) -> np.ndarray:
    """`column` of `stage`'s latest records, aligned to the shard ids `ids` (0 where none)."""
    out = np.zeros(len(ids), np.int64)
    rows = records.filter(pc.equal(records.column("stage"), stage))
    if rows.num_rows:
        at = pc.index_in(rows.column("shard_id"), value_set=ids).to_numpy(zero_copy_only=False)
        out[at] = pc.fill_null(rows.column(column), 0).to_numpy(zero_copy_only=False)
    return out


def record(lake: Lake, stage: str, shard_ids: Iterable[str], *, run_id: str,
           sources: dict[str, dict] | None = None) -> list[dict]:
    """Recount `shard_ids` at `stage` from their partitions and append their records.

    `sources` (ingest): shard id -> {"source_uri", "size", "mtime_ns", "truncated", "detail"}.
    """
    shard_ids = sorted(set(shard_ids))
    if not shard_ids:
        return []
    faults.reached("record")
    counts = _COUNTERS[stage](lake, shard_ids)
    now = utcnow()
    rows = []
    for shard_id in shard_ids:
        rows_out, rejected = counts.get(shard_id, (0, Counter()))
        n_rejected = sum(rejected.values())
        rows.append({"shard_id": shard_id, "stage": stage, "rows_in": rows_out + n_rejected, "rows_out": rows_out,
                     "rejected": n_rejected, "reasons": json.dumps(dict(sorted(rejected.items()))),
                     **(sources or {}).get(shard_id, {}), "run_id": run_id, "recorded_at": now})
    lake.append(PROGRESS, pa.Table.from_pylist(rows, schema=schemas.PROGRESS.arrow))
    return rows


def _group(table: pa.Table, *, ok: pa.Array | None = None, reason: pa.Array | None = None) -> dict:
    """shard id -> (rows where ok, Counter of reasons of the other rows)."""
    out: dict[str, tuple[int, Counter]] = {}
    shard = table.column("shard_id").to_pylist()
    oks = [True] * len(shard) if ok is None else ok.to_pylist()
    reasons = [None] * len(shard) if reason is None else reason.to_pylist()
    for s, k, r in zip(shard, oks, reasons):
        n, c = out.get(s, (0, Counter()))
        if k:
            n += 1
        else:
            c[r or "unknown"] += 1
        out[s] = (n, c)
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for s, (n, c) in b.items():
        n0, c0 = out.get(s, (0, Counter()))
        out[s] = (n0 + n, c0 + c)
    return out


def _rejected(lake: Lake, shard_ids: list[str], stage: str) -> dict:
    rej = lake.read("rejected", ["shard_id", "stage", "reason"], shards=shard_ids)
    rej = rej.filter(pc.equal(rej.column("stage"), stage))
    return _group(rej, ok=pa.array([False] * rej.num_rows), reason=rej.column("reason"))


def _count_download(lake: Lake, shard_ids: list[str]) -> dict:
    # Out: what the downloader wrote, which is what ingest read (pairs and ingest rejections alike);
    # rejected: the download failures only (ingest's rejections are counted at ingest, once).
    written = {s: (n + sum(c.values()), Counter()) for s, (n, c) in _count_ingest(lake, shard_ids).items()}
    return _merge(written, _rejected(lake, shard_ids, "download"))


def _count_ingest(lake: Lake, shard_ids: list[str]) -> dict:
    return _merge(_group(lake.read("pairs", ["shard_id"], shards=shard_ids)), _rejected(lake, shard_ids, "ingest"))


def _count_filter(lake: Lake, shard_ids: list[str]) -> dict:
    v = lake.read("filter_results", ["shard_id", "kept", "reason"], shards=shard_ids)
    return _group(v, ok=pc.fill_null(v.column("kept"), False), reason=v.column("reason"))


def _count_caption(lake: Lake, shard_ids: list[str]) -> dict:
    return _merge(_group(lake.read("captions", ["shard_id"], shards=shard_ids)), _rejected(lake, shard_ids, "caption"))


def _count_publish(lake: Lake, shard_ids: list[str]) -> dict:
    q = lake.read("quarantine", ["shard_id"], shards=shard_ids)
    quarantined = _group(q, ok=pa.array([False] * q.num_rows), reason=pa.array(["quarantined"] * q.num_rows))
    return _merge(_group(lake.read("recap", ["shard_id"], shards=shard_ids)), quarantined)


_COUNTERS = {"download": _count_download, "ingest": _count_ingest, "filter": _count_filter,
             "caption": _count_caption, "publish": _count_publish}


def summary(lake: Lake) -> dict:
    """Lake-wide counts from the latest records, and whether every shard's counts add up."""
    records = latest(lake)  # sorted by shard, then stage
    shard_ids = pc.unique(records.column("shard_id").combine_chunks())
    shards = shard_ids.to_numpy(zero_copy_only=False)
    per = {stage: records.filter(pc.equal(records.column("stage"), stage)) for stage in STAGES}

    def col(stage: str, name: str) -> np.ndarray:
        return per_shard_counts(records, shard_ids, stage, name)

    def reasons(stage: str) -> dict[str, int]:
        # Each distinct JSON once (most shards share a handful: "{}", one or two reasons), times
        # its shard count: the cost follows distinct reason mixes, not shards.
        total: Counter = Counter()
        for mix in pc.value_counts(per[stage].column("reasons").drop_null()).to_pylist():
            for reason, rows in json.loads(mix["values"]).items():
                total[reason] += rows * mix["counts"]
        return dict(sorted(total.items()))

    passed, read = col("ingest", "rows_out"), col("ingest", "rows_in")
    # A metadata row whose download failed never reached ingest, yet is an input row of the lake.
    download_failed = col("download", "rejected")
    read = read + download_failed
    kept, judged = col("filter", "rows_out"), col("filter", "rows_in")
    captioned, cap_settled = col("caption", "rows_out"), col("caption", "rows_in")
    published, pub_settled = col("publish", "rows_out"), col("publish", "rows_in")
    pending_filter, pending_caption = passed - judged, kept - cap_settled
    unpublished = captioned - pub_settled
    # Each shard's rows are in exactly one place: no stage may have settled more than it was given.
    bad = (pending_filter < 0) | (pending_caption < 0) | (unpublished < 0)
    ingest = per["ingest"]
    truncated = ingest.column("shard_id").filter(pc.fill_null(ingest.column("truncated"), False))
    by_stage = {s: r for s, r in (("download", reasons("download")), ("ingest", reasons("ingest")),
                                  ("filter", reasons("filter")), ("caption", reasons("caption"))) if r}
    return {
        "shards": len(shards),
        "ingested": int(read.sum()),
        "downloaded": {"rows": int(col("download", "rows_in").sum()), "failed": int(download_failed.sum())},
        "passed_ingest": int(passed.sum()),
        "rejected_by_stage": by_stage,
        "kept": int(kept.sum()),
        "dropped": int((judged - kept).sum()),
        "pending_filter": int(pending_filter.sum()),
        "captioned": int(captioned.sum()),
        "pending_caption": int(pending_caption.sum()),
        "captioned_unpublished": int(unpublished.sum()),
        "quarantined": int((pub_settled - published).sum()),
        "published": int(published.sum()),
        "unbalanced_shards": sorted(shards[bad].tolist()),
        "truncated_shards": sorted(truncated.to_pylist()),
    }
