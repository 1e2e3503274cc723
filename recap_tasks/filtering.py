"""Filter stage: pairs not yet filtered -> `filter_results` (scores + verdicts) and `rejected`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from recap_tasks import lake as tables
from recap_tasks.config import FilterConfig
from recap_tasks.filters import PairFilter
from recap_tasks.filters.basic import CaptionLengthFilter, ImageSizeFilter
from recap_tasks.lake import Lake, not_in
from recap_tasks.runs import new_run_id, progress, utcnow

log = logging.getLogger(__name__)


def default_chain(config: FilterConfig) -> list[PairFilter]:
    return [CaptionLengthFilter(config), ImageSizeFilter(config)]


@dataclass
class FilterResult:
    run_id: str
    rows_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"run_id": self.run_id, "rows_in": self.rows_in, "kept": self.kept, "dropped": self.dropped}


def run_filter(lake: Lake, *, config: FilterConfig | None = None, run_id: str | None = None,
               chain: list[PairFilter] | None = None) -> FilterResult:
    """Filter every ingested pair that has no verdict yet, one shard at a time."""
    config = config or FilterConfig()
    run_id = run_id or new_run_id()
    chain = chain if chain is not None else default_chain(config)
    pairs = lake.read(tables.PAIRS, ["uid", "key", "org_caption", "width", "height", "shard_id"])
    pending = pairs.filter(not_in(pairs.column("uid"), lake.uids(tables.FILTER_RESULTS)))
    result = FilterResult(run_id, rows_in=pending.num_rows)
    shard_ids = sorted(set(pending.column("shard_id").to_pylist()))
    shard_col = pending.column("shard_id")
    for shard_id in progress(shard_ids, desc="filter", unit="shard"):
        batch = pending.filter(pa.compute.equal(shard_col, shard_id))
        verdicts, rejected = apply_chain(batch, chain, run_id=run_id)
        for reason in rejected.column("reason").to_pylist():
            result.dropped[reason] = result.dropped.get(reason, 0) + 1
        result.kept += int(pa.compute.sum(verdicts.column("kept")).as_py() or 0)
        # Rejections first: a crash between the writes leaves the row unfiltered, and the rerun
        # inserts only what is missing.
        lake.insert_new(tables.REJECTED, rejected, keys=("uid", "stage"))
        lake.insert_new(tables.FILTER_RESULTS, verdicts)
    log.info("filter %s: %s", run_id, result.summary())
    return result


def apply_chain(batch: pa.Table, chain: list[PairFilter], *, run_id: str) -> tuple[pa.Table, pa.Table]:
    """Run filters in order on the survivors; return (filter_results rows, rejected rows)."""
    n = batch.num_rows
    alive = np.ones(n, dtype=bool)
    reason: list[str | None] = [None] * n
    scores: dict[str, np.ndarray] = {}
    for flt in chain:
        idx = np.flatnonzero(alive)
        if idx.size == 0:
            break
        sub = batch.take(pa.array(idx))
        for decision in flt.decide(sub):
            for name, values in decision.scores.items():
                if name not in scores:
                    scores[name] = np.full(n, np.nan, dtype=np.float64)
                scores[name][idx] = values
            dropped = idx[~decision.keep & alive[idx]]
            for i in dropped:
                reason[i] = decision.reason
            alive[dropped] = False
    now = utcnow()
    schema = tables.schemas.FILTER_RESULTS.arrow
    columns: dict[str, pa.Array] = {
        "uid": batch.column("uid"),
        "shard_id": batch.column("shard_id"),
        "kept": pa.array(alive),
        "reason": pa.array(reason, pa.string()),
    }
    for name, values in scores.items():
        if name in schema.names:
            columns[name] = pa.array(values, mask=np.isnan(values)).cast(schema.field(name).type)
    columns["run_id"] = pa.array([run_id] * n, pa.string())
    columns["filtered_at"] = pa.array([now] * n, schema.field("filtered_at").type)
    verdicts = pa.table(columns)
    dropped_idx = pa.array(np.flatnonzero(~alive))
    dropped_rows = batch.take(dropped_idx)
    rejected = pa.table({
        "uid": dropped_rows.column("uid"),
        "key": dropped_rows.column("key"),
        "shard_id": dropped_rows.column("shard_id"),
        "stage": pa.array(["filter"] * len(dropped_idx), pa.string()),
        "reason": pa.array([reason[i] for i in dropped_idx.to_pylist()], pa.string()),
        "detail": pa.array([_detail(scores, i) for i in dropped_idx.to_pylist()], pa.string()),
        "run_id": pa.array([run_id] * len(dropped_idx), pa.string()),
        "rejected_at": pa.array([now] * len(dropped_idx), tables.schemas.REJECTED.arrow.field("rejected_at").type),
    })
    return verdicts, rejected


def _detail(scores: dict[str, np.ndarray], i: int) -> str:
    parts = [f"{k}={v[i]:.4g}" for k, v in scores.items() if not np.isnan(v[i])]
    return ", ".join(parts)
