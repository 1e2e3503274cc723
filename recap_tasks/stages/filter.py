"""Filter stage: pairs not yet filtered -> `filter_results` (scores + verdicts) and `rejected`.

Row filters run per shard on Dask workers (models loaded once per worker process); corpus filters
(duplicates, boilerplate captions) then run in the driver over the survivors of the whole run and
the rows kept by earlier runs. All Delta writes happen in the driver.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import lake as tables
from recap_tasks import progress
from recap_tasks.blur import store_blurred
from recap_tasks.config import FilterConfig, RecapConfig
from recap_tasks.errors import RecapError
from recap_tasks.filters import CorpusFilter, ModelLoadError, PairFilter
from recap_tasks.filters import dedup_index
from recap_tasks.filters.chain import build_chain, run_corpus, run_rows
from recap_tasks.filters.dedup import ImageDedupFilter
from recap_tasks.lake import Lake, not_in
from recap_tasks.runs import new_run_id, progress_bar, utcnow

log = logging.getLogger(__name__)

# What a worker needs of a pair: the caption and size for the rules, the pointer for the image.
_COLUMNS = ["uid", "key", "org_caption", "sha256", "width", "height", "shard_id", "source_uri", "source_format",
            "image_offset", "image_size", "source_row", "image_column", "face_bboxes"]


def default_chain(config: FilterConfig) -> list[PairFilter]:
    return build_chain(config)


class ShardsFailed(RecapError):
    """Some shards could not be filtered; the others' results are written. Rerun to retry them."""

    exit_code = 1

    def __init__(self, result: "FilterResult"):
        shards = ", ".join(f"{s} ({e.splitlines()[0][:200]})" for s, e in sorted(result.failed_shards.items()))
        super().__init__(f"filter failed on {len(result.failed_shards)} shard(s): {shards}")
        self.result = result


@dataclass
class FilterResult:
    run_id: str
    rows_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    failed_shards: dict[str, str] = field(default_factory=dict)  # shard id -> error
    seconds: dict[str, float] = field(default_factory=dict)  # per filter, summed over workers
    face_sources: dict[str, int] = field(default_factory=dict)  # rows whose face boxes came from each source

    def summary(self) -> dict:
        return {"run_id": self.run_id, "rows_in": self.rows_in, "kept": self.kept, "dropped": self.dropped,
                "failed_shards": sorted(self.failed_shards), "face_sources": self.face_sources}


def run_filter(lake: Lake, *, config: FilterConfig | None = None, run_id: str | None = None,
               chain: list[PairFilter] | None = None, shard_ids: list[str] | None = None) -> FilterResult:
    """Filter the pairs of `shard_ids` that have no verdict yet (default: every shard the progress
    records show pending). Reads only those shards' partitions and the dedup index entries their
    images fall on.

    Raises ModelLoadError before judging anything when a model cannot load, and ShardsFailed after
    writing the other shards' results when some shards failed.
    """
    config = config or RecapConfig.load().filter
    run_id = run_id or new_run_id()
    if shard_ids is not None:
        progress.require_known(lake, shard_ids)
    # The chain is built and checked (files, filter names, model paths) even when nothing is
    # pending: a setting that cannot work fails the first scheduled run, not the first with data.
    driver_chain = chain if chain is not None else build_chain(config)
    for flt in driver_chain:
        flt.check()
    targets = sorted(set(shard_ids)) if shard_ids is not None else progress.pending_shards(lake, "filter")
    pairs = lake.read(tables.PAIRS, _COLUMNS, shards=targets)
    judged = lake.read(tables.FILTER_RESULTS, ["uid", "kept", "phash"], shards=targets)
    # Before judging anything against the index: kept rows of a run that died after committing its
    # verdicts and before appending their index entries.
    _index_unindexed(lake, pairs, judged, config)
    pending = pairs.filter(not_in(pairs.column("uid"), judged.column("uid").combine_chunks()))
    result = FilterResult(run_id, rows_in=pending.num_rows)
    if pending.num_rows == 0:
        # Verdicts may have been committed by a run that died before recording them.
        progress.record(lake, "filter", targets, run_id=run_id)
        log.info("filter %s: nothing to filter", run_id)
        return result
    shards = {s: pending.filter(pc.equal(pending.column("shard_id"), s))
              for s in sorted(set(pending.column("shard_id").to_pylist()))}
    outputs: dict[str, dict] = {}
    for shard_id, out in _run_shards(shards, config, chain, result):
        store_blurred(lake, shard_id, run_id, out.pop("images"))
        outputs[shard_id] = out
    if not outputs:
        raise ShardsFailed(result)
    verdicts, rejected = _decide(lake, pending, outputs, driver_chain, run_id, config)
    for reason in rejected.column("reason").to_pylist():
        result.dropped[reason] = result.dropped.get(reason, 0) + 1
    result.kept = int(pc.sum(verdicts.column("kept")).as_py() or 0)
    if "face_source" in verdicts.column_names:
        result.face_sources = dict(Counter(s for s in verdicts.column("face_source").to_pylist() if s))
    result.rows_in = verdicts.num_rows
    # Rejections first: a crash between the writes leaves the row unfiltered, and the rerun
    # inserts only what is missing. Then the index entries of the kept rows, then the records.
    lake.insert_new(tables.REJECTED, rejected, keys=("uid", "stage"))
    lake.insert_new(tables.FILTER_RESULTS, verdicts)
    dedup_index.add_kept(lake, verdicts, dict(zip(pending.column("uid").to_pylist(),
                                                  pending.column("sha256").to_pylist())), config.max_phash_distance)
    progress.record(lake, "filter", [s for s in targets if s not in result.failed_shards], run_id=run_id)
    summary = {**result.summary(), "seconds": result.seconds, "shards": sorted(outputs), "chain": config.chain}
    lake.write_json(f"_runs/{run_id}/filter_summary.json" if shard_ids is None else
                    f"_runs/{run_id}/filter_summary-{_short_hash(sorted(shard_ids))}.json", summary)
    log.info("filter %s: %s", run_id, result.summary())
    if result.failed_shards:
        raise ShardsFailed(result)
    return result


def _index_unindexed(lake: Lake, pairs: pa.Table, judged: pa.Table, config: FilterConfig) -> int:
    """Add the dedup index entries of kept verdicts (`judged`: uid, kept, phash, of the shards being
    filtered) that have none: the index is appended after the verdicts, so a run killed between the
    two commits leaves kept images that later runs would not see as duplicates. One commit appends
    all kinds of a row's entries, so its `sha` entry tells whether it was indexed. Returns entries added.
    """
    kept = judged.filter(pc.fill_null(judged.column("kept"), False))
    if kept.num_rows == 0:
        return 0
    sha_of = {u: s for u, s in zip(pairs.column("uid").to_pylist(), pairs.column("sha256").to_pylist())
              if s is not None}  # ingest hashes every pair's image
    kept = kept.filter(pc.is_in(kept.column("uid"), value_set=pa.array(list(sha_of), pa.string())))
    if kept.num_rows == 0:
        return 0
    keys = dedup_index.sha_key([sha_of[u] for u in kept.column("uid").to_pylist()])
    indexed = dedup_index.lookup(lake, dedup_index.SHA, keys, keys, ["uid"]).column("uid").combine_chunks()
    kept = kept.filter(not_in(kept.column("uid").combine_chunks(), indexed))
    if kept.num_rows == 0:
        return 0
    log.warning("filter: %d kept rows were never added to the dedup index (a run died between its "
                "commits); adding them", kept.num_rows)
    return dedup_index.add_kept(lake, kept, sha_of, config.max_phash_distance)


def _run_shards(shards: dict[str, pa.Table], config: FilterConfig, chain: list[PairFilter] | None,
                result: FilterResult):
    """Yield (shard id, output) as shards finish; failures go to result.failed_shards."""
    bar = progress_bar(desc="filter", total=len(shards), unit="shard")
    if config.executor == "local":
        import os

        for shard_id, rows in shards.items():
            try:
                out = filter_shard(shard_id, rows, config, threads=os.cpu_count() or 1, chain=chain)
            except ModelLoadError:
                raise
            except Exception as exc:
                _shard_failed(result, shard_id, exc)
                continue
            finally:
                bar.update(1)
            _add_seconds(result, out)
            yield shard_id, out
        bar.close()
        return
    from distributed import as_completed

    from recap_tasks.distributed import dask_client

    with dask_client(config.dask_address, workers=config.workers) as (client, threads):
        futures = {}
        for shard_id, rows in shards.items():
            fut = client.submit(filter_shard, shard_id, rows, config, threads=threads, chain=chain,
                                key=f"filter-{shard_id}-{uuid.uuid4().hex[:12]}", retries=0)
            futures[fut] = shard_id
        for fut in as_completed(futures):
            shard_id = futures[fut]
            bar.update(1)
            try:
                out = fut.result()
            except ModelLoadError:
                client.cancel(list(futures))
                raise
            except Exception as exc:
                _shard_failed(result, shard_id, exc)
                continue
            _add_seconds(result, out)
            yield shard_id, out
    bar.close()


def _shard_failed(result: FilterResult, shard_id: str, exc: BaseException) -> None:
    log.error("filter: shard %s failed: %s: %s", shard_id, type(exc).__name__, exc)
    result.failed_shards[shard_id] = f"{type(exc).__name__}: {exc}"


def _add_seconds(result: FilterResult, out: dict) -> None:
    for name, s in out["seconds"].items():
        result.seconds[name] = result.seconds.get(name, 0.0) + s


# Workers --------------------------------------------------------------------------------

_WORKER_CHAINS: dict[str, list[PairFilter]] = {}
MODEL_LOADS: Counter = Counter()  # chains built (models loaded) in this process, per config


def worker_chain(config: FilterConfig, threads: int) -> list[PairFilter]:
    """This process's chain for `config`, built and loaded on first use, then reused by every task."""
    # Where and how a shard runs does not change the models: those fields stay out of the key.
    key = repr((dataclasses.replace(config, dask_address=None, workers=None, executor="dask", batch_size=1), threads))
    chain = _WORKER_CHAINS.get(key)
    if chain is None:
        chain = build_chain(config, threads=threads)
        for flt in chain:
            flt.load()
        _WORKER_CHAINS[key] = chain
        MODEL_LOADS[config.chain] += 1
    return chain


def model_loads() -> dict[str, int]:
    """How many times this process built (and loaded the models of) each chain; for tests."""
    return dict(MODEL_LOADS)


def filter_shard(shard_id: str, rows: pa.Table, config: FilterConfig, *, threads: int = 1,
                 chain: list[PairFilter] | None = None) -> dict:
    """One work unit: the row filters over one shard's pending pairs, `config.batch_size` at a time.

    Returns {"table": uid, alive, reason, scores; "images": uid -> blurred bytes; "errors";
    "seconds" per filter}. Rows are judged independently, so a bad row never fails the shard; an
    unreadable source shard does (it is reported with the shard id).
    """
    import time

    from recap_tasks.images import read_images

    if chain is None:
        chain = worker_chain(config, threads)
    else:
        for flt in chain:
            flt.load()
    parts, images, errors, seconds = [], {}, [], {}
    t_start = time.perf_counter()
    for start in range(0, rows.num_rows, config.batch_size):
        batch = rows.slice(start, config.batch_size)
        v = run_rows(batch, chain, max_side=config.max_decode_side, read_images=read_images)
        uids = batch.column("uid").to_pylist()
        columns = {"uid": pa.array(uids, pa.string()), "alive": pa.array(v.alive),
                   "reason": pa.array(v.reason, pa.string())}
        for name, values in v.scores.items():
            columns[name] = _score_array(name, values)
        errors_by_row = {i: f"{flt}: {err}" for i, flt, err in v.errors}
        columns["error"] = pa.array([errors_by_row.get(i) for i in range(batch.num_rows)], pa.string())
        parts.append(pa.table(columns))
        images.update({uids[i]: data for i, data in v.images.items()})
        errors += [(uids[i], flt, err) for i, flt, err in v.errors]
        for name, s in v.seconds.items():
            seconds[name] = seconds.get(name, 0.0) + s
    seconds["shard_total"] = time.perf_counter() - t_start
    table = pa.concat_tables(parts, promote_options="default")
    return {"table": table, "images": images, "errors": errors, "seconds": seconds}


def _score_array(name: str, values: list) -> pa.Array:
    schema = tables.schemas.FILTER_RESULTS.arrow
    if name in schema.names:
        return pa.array(values, schema.field(name).type)
    return pa.array(values)


# Driver: corpus filters and the rows to write ----------------------------------------------

def _decide(lake: Lake, pending: pa.Table, outputs: dict[str, dict], chain: list[PairFilter],
            run_id: str, config: FilterConfig) -> tuple[pa.Table, pa.Table]:
    """(filter_results rows, rejected rows) for the pending pairs the workers judged."""
    rows = _merge_outputs(pending, outputs)
    alive = rows.column("alive").to_numpy(zero_copy_only=False).astype(bool)
    reason = rows.column("reason").to_pylist()
    scores = {name: rows.column(name).to_pylist() for name in rows.column_names if name not in _NOT_SCORES}
    if any(isinstance(f, CorpusFilter) for f in chain):
        _apply_corpus_filters(lake, rows, chain, config, alive, reason, scores)
    now = utcnow()
    return (_verdict_rows(rows, alive, reason, scores, run_id, now),
            _rejection_rows(rows, alive, reason, scores, run_id, now))


# Columns of the merged rows that are not a filter's score.
_NOT_SCORES = {"uid", "alive", "reason", "error", "key", "shard_id", "org_caption", "sha256", "width", "height"}


def _merge_outputs(pending: pa.Table, outputs: dict[str, dict]) -> pa.Table:
    """The workers' verdicts and scores with each pair's own columns, sorted by shard and uid."""
    scored = pa.concat_tables([o["table"] for o in outputs.values()], promote_options="default").combine_chunks()
    meta = pending.select(["uid", "key", "shard_id", "org_caption", "sha256", "width", "height"])
    # A dict join: Acero's hash join warns about the buffers tables arrive with from workers.
    where = {u: i for i, u in enumerate(meta.column("uid").to_pylist())}
    meta = meta.take(pa.array([where[u] for u in scored.column("uid").to_pylist()], pa.int64()))
    rows = scored.drop_columns([c for c in meta.column_names if c != "uid" and c in scored.column_names])
    for name in meta.column_names[1:]:
        rows = rows.append_column(name, meta.column(name))
    return rows.take(pc.sort_indices(rows, [("shard_id", "ascending"), ("uid", "ascending")]))


def _apply_corpus_filters(lake: Lake, rows: pa.Table, chain: list[PairFilter], config: FilterConfig,
                          alive: np.ndarray, reason: list, scores: dict[str, list]) -> None:
    """Run the chain's corpus filters (dedup) over the rows still alive; their verdicts and scores
    go into `alive`, `reason` and `scores` in place."""
    idx = np.flatnonzero(alive)
    if "phash" not in rows.column_names:
        rows = rows.append_column("phash", pa.nulls(rows.num_rows, pa.int64()))
    survivors = rows.take(pa.array(idx))
    # Earlier kept images these may duplicate: index lookups by their own keys only.
    needs_history = any(isinstance(f, ImageDedupFilter) for f in chain)
    history = dedup_index.history(lake, survivors.select(["uid", "sha256", "phash"]), config.max_phash_distance) \
        if needs_history else dedup_index.EMPTY_HISTORY
    c_alive, c_reason, c_scores = run_corpus(survivors, chain, history)
    for j, i in enumerate(idx):
        if not c_alive[j]:
            alive[i], reason[i] = False, c_reason[j]
    for name, values in c_scores.items():
        column = scores.setdefault(name, [None] * rows.num_rows)
        for j, i in enumerate(idx):
            if values[j] is not None:
                column[i] = values[j]


def _verdict_rows(rows: pa.Table, alive: np.ndarray, reason: list, scores: dict[str, list], run_id: str,
                  now: datetime) -> pa.Table:
    """One filter_results row per pair: kept or not, the reason, and the scores the table holds."""
    schema = tables.schemas.FILTER_RESULTS.arrow
    n = rows.num_rows
    columns = {"uid": rows.column("uid"), "shard_id": rows.column("shard_id"), "kept": pa.array(alive),
               "reason": pa.array(reason, pa.string())}
    for name, values in scores.items():
        if name in schema.names:
            columns[name] = pa.array(values, schema.field(name).type)
    columns["run_id"] = pa.array([run_id] * n, pa.string())
    columns["filtered_at"] = pa.array([now] * n, schema.field("filtered_at").type)
    return pa.table(columns)


def _rejection_rows(rows: pa.Table, alive: np.ndarray, reason: list, scores: dict[str, list], run_id: str,
                    now: datetime) -> pa.Table:
    """One rejected row per dropped pair; its detail is the worker's error, or else its scores."""
    errors = rows.column("error").to_pylist()
    dropped = np.flatnonzero(~alive)
    return pa.table({
        "uid": rows.column("uid").take(pa.array(dropped)),
        "key": rows.column("key").take(pa.array(dropped)),
        "shard_id": rows.column("shard_id").take(pa.array(dropped)),
        "stage": pa.array(["filter"] * len(dropped), pa.string()),
        "reason": pa.array([reason[i] for i in dropped], pa.string()),
        "detail": pa.array([errors[i] or _detail(scores, i) for i in dropped], pa.string()),
        "run_id": pa.array([run_id] * len(dropped), pa.string()),
        "rejected_at": pa.array([now] * len(dropped), tables.schemas.REJECTED.arrow.field("rejected_at").type),
    })


def _detail(scores: dict[str, list], i: int) -> str:
    parts = []
    for k, values in scores.items():
        v = values[i]
        if v is None or k == "face_boxes" or (isinstance(v, float) and np.isnan(v)):
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def _short_hash(items: list[str]) -> str:
    import hashlib

    return hashlib.sha1("\n".join(items).encode()).hexdigest()[:12]


# The funnel -------------------------------------------------------------------------------

def funnel(lake: Lake) -> dict:
    """Per filter run: rows in, dropped per reason (most first), rows out; from the runs' summaries.

    {run_id: {"rows_in": int, "dropped": {reason: int}, "rows_out": int}}, runs in id (time) order.
    Each filter call writes `_runs/<run id>/filter_summary-<shards>.json`; this sums them per run.
    """
    out: dict[str, dict] = {}
    for run_dir in lake.list_dirs("_runs"):
        for rel in lake.list(run_dir, ".json"):
            if not rel.rsplit("/", 1)[-1].startswith("filter_summary"):
                continue
            s = lake.read_json(rel) or {}
            run = out.setdefault(s.get("run_id", run_dir.rsplit("/", 1)[-1]),
                                 {"rows_in": 0, "dropped": Counter(), "rows_out": 0})
            run["rows_in"] += int(s.get("rows_in", 0))
            run["rows_out"] += int(s.get("kept", 0))
            run["dropped"].update(s.get("dropped", {}))
    return {r: {**v, "dropped": dict(v["dropped"].most_common())} for r, v in sorted(out.items()) if v["rows_in"]}
