"""`recap status`: where every input row of the lake is, and whether the counts add up.

The lake-wide view sums the per-shard progress records (recap_tasks.progress): its cost follows
the number of shards, never the number of rows. `reconcile` checks the same invariant exactly, uid
by uid, on a set of shards (what validation does for each batch, and `recap status --verify`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import progress, schemas
from recap_tasks.batches import all_batches
from recap_tasks.stages.filter import funnel
from recap_tasks.lake import Lake, not_in


def lake_status(lake: Lake) -> dict:
    """Counts by stage; `balanced` is true when every shard's counts add up at every stage."""
    s = progress.summary(lake)
    by_stage = s["rejected_by_stage"]
    rejected_total = sum(sum(r.values()) for r in by_stage.values())
    in_flight = s["pending_filter"] + s["pending_caption"] + s["captioned_unpublished"]
    batches = all_batches(lake)
    last = batches[-1] if batches else None
    return {
        "lake": lake.uri,
        "ingested": s["ingested"],  # every sample read from a source shard, and every metadata row downloaded
        "downloaded": s["downloaded"],  # shards a downloader wrote: metadata rows, and those that failed
        "passed_ingest": s["passed_ingest"],
        "rejected": {"total": rejected_total, "by_stage": by_stage},
        "filtered": {"kept": s["kept"], "dropped": s["dropped"], "pending": s["pending_filter"]},
        "captioned": s["captioned"],
        "pending_caption": s["pending_caption"],
        "captioned_unpublished": s["captioned_unpublished"],
        "quarantined": s["quarantined"],
        "published": s["published"],
        "in_flight": in_flight,
        # ingested = published + rejected + quarantined + in flight, shard by shard
        "balanced": not s["unbalanced_shards"] and
        s["ingested"] == s["published"] + rejected_total + s["quarantined"] + in_flight,
        "unbalanced_shards": s["unbalanced_shards"][:20],
        "shards": {"ingested": s["shards"], "truncated": s["truncated_shards"]},
        "last_batch": None if last is None else {"batch_id": last.batch_id, "rows": last.rows,
                                                 "success": last.success, "failed": last.failed,
                                                 "quarantined": last.quarantined,
                                                 "published": last.published, "report": last.report},
        "filter_funnel": funnel(lake),  # per run: rows in, dropped per reason, rows out
        "table_versions": {t: lake.version(t) for t in schemas.TABLES},
    }


def reconcile(lake: Lake, shard_ids: list[str]) -> dict:
    """Uid by uid, on `shard_ids` only: every pair is in exactly one place.

    Places: published, rejected after ingest, quarantined, or in flight (no verdict yet, kept and
    not captioned, captioned and not yet published). Returns the counts and `balanced`.
    """
    return _places(_read_shards(lake, shard_ids), len(shard_ids))


# The columns each check reads, per table: one read of each serves `reconcile` and `verify`.
_COLUMNS = {"pairs": ["uid", "shard_id"], "rejected": ["uid", "shard_id", "stage"],
            "filter_results": ["uid", "shard_id", "kept"], "captions": ["uid", "shard_id"],
            "recap": ["uid", "shard_id"], "quarantine": ["uid", "shard_id"]}


def _read_shards(lake: Lake, shard_ids: list[str]) -> dict[str, pa.Table]:
    return {table: lake.read(table, columns, shards=shard_ids) for table, columns in _COLUMNS.items()}


def _uids(table: pa.Table) -> pa.Array:
    return table.column("uid").combine_chunks()


def _places(rows: dict[str, pa.Table], shards: int) -> dict:
    pairs, rejected, verdicts = _uids(rows["pairs"]), rows["rejected"], rows["filter_results"]
    # Download and ingest rejections never became pairs; later stages reject pairs.
    later = rejected.filter(pc.invert(pc.is_in(rejected.column("stage"), value_set=pa.array(["download", "ingest"]))))
    later = pc.unique(later.column("uid").combine_chunks())
    kept = verdicts.filter(pc.fill_null(verdicts.column("kept"), False)).column("uid").combine_chunks()
    captioned, published, quarantined = _uids(rows["captions"]), _uids(rows["recap"]), _uids(rows["quarantine"])
    places = {
        "published": published,
        "rejected": later,
        "quarantined": quarantined,
        "pending_filter": pairs.filter(not_in(pairs, _uids(verdicts))),
        "pending_caption": kept.filter(not_in(kept, pa.concat_arrays([captioned, later]))),
        "captioned_unpublished": captioned.filter(not_in(captioned, pa.concat_arrays([published, quarantined]))),
    }
    everywhere = pa.concat_arrays([a.cast(pa.string()) for a in places.values()])
    n = len(pairs)
    balanced = len(everywhere) == n and len(pc.unique(everywhere)) == n and \
        bool(pc.all(pc.is_in(everywhere, value_set=pairs)).as_py() if len(everywhere) else True)
    return {"shards": shards, "passed_ingest": n, **{k: len(v) for k, v in places.items()},
            "balanced": balanced}


# Table of a stage's output rows, and the progress record field that says how many it had.
_RECORDED = (("pairs", "ingest", "rows_out"), ("filter_results", "filter", "rows_in"),
             ("captions", "caption", "rows_out"), ("recap", "publish", "rows_out"))


def verify(lake: Lake, shard_ids: list[str]) -> dict:
    """Check `shard_ids` row by row, beyond `reconcile`'s places: every table's rows against the
    shard's progress records (a table holding fewer rows than its stage recorded lost rows), no uid
    twice in a table, and every uid of a published batch still published (or quarantined).

    Returns {"checked": {place: rows}, "problems": [{"shard", "table", "kind", "detail"}], "ok"}.
    A table holding *more* rows than its record is not a problem: a stage that crashed between its
    data commit and its record is in flight, and its rerun records it.
    """
    shard_ids = sorted(set(shard_ids))
    rows = _read_shards(lake, shard_ids)  # each table once, for every check below
    places = _places(rows, len(shard_ids))
    recorded = _Recorded(progress.latest(lake, shard_ids=shard_ids), shard_ids)
    problems: list[dict] = []
    checked: dict[str, int] = {}
    for table, stage, field in _RECORDED:
        checked[table] = rows[table].num_rows
        problems += recorded.shortfalls(table, rows[table], stage, field, "rows")
        problems += _duplicated_uids(table, rows[table])
    # Rejections per stage against the records that `recap status` sums (download and ingest, whose
    # rows never became pairs; later stages' rejections are inside their stage's counts above).
    rejected = rows["rejected"]
    checked["rejected"] = rejected.num_rows
    for stage in ("download", "ingest"):
        problems += recorded.shortfalls("rejected", rejected.filter(pc.equal(rejected.column("stage"), stage)),
                                        stage, "rejected", f"{stage} rejections")
    lost, checked["published batch uids"] = _unpublished_batch_rows(lake, shard_ids, rows)
    problems += lost
    if not places["balanced"]:
        problems.append({"shard": ", ".join(shard_ids[:5]) + (" ..." if len(shard_ids) > 5 else ""),
                         "table": "*", "kind": "unbalanced",
                         "detail": "uids are not each in exactly one place (published, rejected, quarantined, in flight)"})
    return {"shards": len(shard_ids), "places": places, "checked": checked,
            "problems": sorted(problems, key=lambda p: (p["shard"], p["table"], p["kind"])), "ok": not problems}


class _Recorded:
    """The shards' latest progress records, to hold each table's rows per shard against."""

    def __init__(self, records: pa.Table, shard_ids: list[str]):
        self.records, self.shard_ids = records, shard_ids
        self.ids = pa.array(shard_ids, pa.string())

    def shortfalls(self, table: str, rows: pa.Table, stage: str, field: str, what: str) -> list[dict]:
        """A `lost` problem per shard whose `rows` of `table` are fewer than its `stage` record's `field`."""
        held = self._per_shard(rows)
        recorded = progress.per_shard_counts(self.records, self.ids, stage, field)
        return [{"shard": self.shard_ids[i], "table": table, "kind": "lost",
                 "detail": f"{table} holds {held[i]} {what}, the {stage} record says {recorded[i]}"}
                for i in np.flatnonzero(held < recorded)]

    def _per_shard(self, rows: pa.Table) -> np.ndarray:
        held = np.zeros(len(self.ids), np.int64)
        if rows.num_rows:
            counts = pc.value_counts(rows.column("shard_id").combine_chunks())
            held[pc.index_in(counts.field("values"), value_set=self.ids).to_numpy(zero_copy_only=False)] = \
                counts.field("counts").to_numpy()
        return held


def _duplicated_uids(table: str, rows: pa.Table) -> list[dict]:
    """A `duplicated` problem per shard with rows of `table` that share a uid with another row."""
    if not rows.num_rows:
        return []
    counts = pc.value_counts(rows.column("uid").combine_chunks())
    twice = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    return _per_shard_problems(rows.filter(pc.is_in(rows.column("uid"), value_set=twice)), table, "duplicated",
                               lambda n: f"{n} rows of {table} share a uid with another row")


def _unpublished_batch_rows(lake: Lake, shard_ids: list[str], rows: dict[str, pa.Table]) -> tuple[list[dict], int]:
    """(A `lost` problem per shard and published batch whose rows are neither published nor
    quarantined now, how many rows of the shards those batches published)."""
    from recap_tasks.batches import read_uids

    settled = pa.concat_arrays([_uids(rows["recap"]), _uids(rows["quarantine"])])
    pairs = rows["pairs"]
    problems: list[dict] = []
    published_uids = 0
    for batch in all_batches(lake):
        if not batch.published or not set(shard_ids).intersection(batch.shards):
            continue
        try:
            uids = read_uids(lake, batch)
        except FileNotFoundError:
            continue
        mine = pairs.filter(pc.is_in(pairs.column("uid"), value_set=uids))
        published_uids += mine.num_rows
        problems += _per_shard_problems(
            mine.filter(not_in(mine.column("uid"), settled)), "recap", "lost",
            lambda n: f"{n} rows of published batch {batch.batch_id} are neither published nor quarantined")
    return problems, published_uids


def _per_shard_problems(rows: pa.Table, table: str, kind: str, detail: Callable[[int], str]) -> list[dict]:
    """One problem per shard among `rows`; `detail` says it from the shard's row count."""
    problems = []
    for shard in sorted(set(rows.column("shard_id").to_pylist())):
        n = pc.sum(pc.equal(rows.column("shard_id"), shard)).as_py()
        problems.append({"shard": shard, "table": table, "kind": kind, "detail": detail(n)})
    return problems


def format_verified(verified: dict) -> str:
    lines = [f"verified {verified['shards']} shards uid by uid:"]
    for place, n in verified["checked"].items():
        lines.append(f"  {place:<22} {n:>9} rows checked")
    places = verified["places"]
    lines.append("  places: " + ", ".join(f"{k} {places[k]}" for k in ("published", "rejected", "quarantined",
                                                                       "pending_filter", "pending_caption",
                                                                       "captioned_unpublished")))
    for p in verified["problems"][:50]:
        lines.append(f"  PROBLEM {p['kind']} in {p['table']}, shard {p['shard']}: {p['detail']}")
    if len(verified["problems"]) > 50:
        lines.append(f"  ... and {len(verified['problems']) - 50} more problems")
    lines.append(f"  verified: {'yes' if verified['ok'] else 'NO'}")
    return "\n".join(lines)


def format_status(status: dict) -> str:
    lines = [f"lake {status['lake']}",
             f"  ingested        {status['ingested']:>9}  (passed {status['passed_ingest']}, "
             f"rejected {sum(status['rejected']['by_stage'].get('ingest', {}).values())}; "
             f"{status['shards']['ingested']} shards)",
             f"  filter          kept {status['filtered']['kept']}, dropped {status['filtered']['dropped']}, "
             f"pending {status['filtered']['pending']}",
             f"  captioned       {status['captioned']:>9}  (pending {status['pending_caption']})",
             f"  quarantined     {status['quarantined']:>9}",
             f"  published       {status['published']:>9}  (captioned, not yet published: "
             f"{status['captioned_unpublished']})",
             f"  rejected        {status['rejected']['total']:>9}"]
    for stage, reasons in status["rejected"]["by_stage"].items():
        for reason, n in reasons.items():
            lines.append(f"    {stage:<8} {reason:<28} {n:>7}")
    downloaded = status.get("downloaded") or {}
    if downloaded.get("rows"):
        lines.insert(1, f"  downloaded      {downloaded['rows'] - downloaded['failed']:>9}  (of {downloaded['rows']} "
                        f"metadata rows; failed {downloaded['failed']}, counted in ingested and rejected)")
    if status["shards"]["truncated"]:
        lines.append(f"  truncated shards: {', '.join(status['shards']['truncated'])}")
    if status["last_batch"]:
        b = status["last_batch"]
        state = "published" if b["published"] else ("valid, unpublished" if b["success"] else "FAILED validation")
        lines.append(f"  last batch {b['batch_id']}: {b['rows']} rows, {b['quarantined']} quarantined, {state}")
        if b["failed"]:
            lines.append(f"    failed: {', '.join(b['failed'])}")
    if status.get("unbalanced_shards"):
        lines.append(f"  shards whose counts do not add up: {', '.join(status['unbalanced_shards'])}")
    lines.append(f"  every row accounted for: {'yes' if status['balanced'] else 'NO'}")
    return "\n".join(lines)
