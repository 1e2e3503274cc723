"""`recap status`: where every input row of the lake is, and whether the counts add up.

The lake-wide view sums the per-shard progress records (recap_tasks.progress): its cost follows
the number of shards, never the number of rows. `reconcile` checks the same invariant exactly, uid
by uid, on a set of shards (what validation does for each batch, and `recap status --verify`).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import progress, schemas
from recap_tasks.batches import all_batches
from recap_tasks.filtering import funnel
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
    pairs = lake.uids("pairs", shards=shard_ids)
    rejected = lake.read("rejected", ["uid", "stage"], shards=shard_ids)
    # Download and ingest rejections never became pairs; later stages reject pairs.
    later = rejected.filter(pc.invert(pc.is_in(rejected.column("stage"), value_set=pa.array(["download", "ingest"]))))
    later = pc.unique(later.column("uid").combine_chunks())
    verdicts = lake.read("filter_results", ["uid", "kept"], shards=shard_ids)
    kept = verdicts.filter(pc.fill_null(verdicts.column("kept"), False)).column("uid").combine_chunks()
    captioned = lake.uids("captions", shards=shard_ids)
    published = lake.uids("recap", shards=shard_ids)
    quarantined = lake.uids("quarantine", shards=shard_ids)
    places = {
        "published": published,
        "rejected": later,
        "quarantined": quarantined,
        "pending_filter": pairs.filter(not_in(pairs, verdicts.column("uid").combine_chunks())),
        "pending_caption": kept.filter(not_in(kept, pa.concat_arrays([captioned, later]))),
        "captioned_unpublished": captioned.filter(not_in(captioned, pa.concat_arrays([published, quarantined]))),
    }
    everywhere = pa.concat_arrays([a.cast(pa.string()) for a in places.values()])
    n = len(pairs)
    balanced = len(everywhere) == n and len(pc.unique(everywhere)) == n and \
        bool(pc.all(pc.is_in(everywhere, value_set=pairs)).as_py() if len(everywhere) else True)
    return {"shards": len(shard_ids), "passed_ingest": n, **{k: len(v) for k, v in places.items()},
            "balanced": balanced}


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
