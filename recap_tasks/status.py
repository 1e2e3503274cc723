"""`recap status`: where every input row of the lake is, and whether the counts add up."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import lake as tables
from recap_tasks.batches import all_batches
from recap_tasks.filtering import funnel
from recap_tasks.lake import Lake, not_in


def lake_status(lake: Lake) -> dict:
    """Counts by stage; `balanced` is true when every ingested row is in exactly one place."""
    pairs = lake.uids(tables.PAIRS)
    rejected = lake.read(tables.REJECTED, ["uid", "stage", "reason"])
    verdicts = lake.read(tables.FILTER_RESULTS, ["uid", "kept"])
    captioned = lake.uids(tables.CAPTIONS)
    published = lake.uids(tables.RECAP)
    quarantined_uids = lake.uids(tables.QUARANTINE)

    by_stage: dict[str, dict[str, int]] = {}
    for stage, reason in zip(rejected.column("stage").to_pylist(), rejected.column("reason").to_pylist()):
        by_stage.setdefault(stage, Counter())[reason] += 1
    rejected_ingest = sum(by_stage.get("ingest", {}).values())
    # Rows past ingest that were rejected later (filter, caption...) are counted once each.
    later = rejected.filter(pc.not_equal(rejected.column("stage"), "ingest")).column("uid")
    later_unique = len(pc.unique(later)) if len(later) else 0
    kept = int(pc.sum(verdicts.column("kept")).as_py() or 0) if verdicts.num_rows else 0

    ingested_ok = len(pairs)
    # Each row that passed ingest must be in exactly one place: published, rejected later, or
    # waiting at one stage. Computed from the uid sets, not from the counts above.
    kept_uids = verdicts.filter(verdicts.column("kept")).column("uid").combine_chunks() if verdicts.num_rows \
        else pa.array([], pa.string())
    places = {
        "published": published,
        "rejected": pc.unique(later.combine_chunks()) if len(later) else pa.array([], pa.string()),
        "pending_filter": pairs.filter(not_in(pairs, verdicts.column("uid").combine_chunks())),
        "pending_caption": kept_uids.filter(not_in(kept_uids, pa.concat_arrays(
            [captioned, later.combine_chunks().cast(pa.string())]))),
        "quarantined": quarantined_uids,
        "captioned_unpublished": captioned.filter(not_in(captioned, pa.concat_arrays([published, quarantined_uids]))),
    }
    everywhere = pa.concat_arrays([a.cast(pa.string()) for a in places.values()])
    balanced = len(everywhere) == ingested_ok and len(pc.unique(everywhere)) == ingested_ok and \
        bool(pc.all(pc.is_in(everywhere, value_set=pairs)).as_py() if len(everywhere) else True)
    pending_filter = len(places["pending_filter"])
    pending_caption = len(places["pending_caption"])
    captioned_unpublished = len(places["captioned_unpublished"])
    in_flight = pending_filter + pending_caption + captioned_unpublished
    quarantined = len(quarantined_uids)

    ledger = [lake.read_json(p) for p in lake.list("_ledger/ingest", ".json")]
    batches = all_batches(lake)
    last = batches[-1] if batches else None
    return {
        "lake": lake.uri,
        "ingested": ingested_ok + rejected_ingest,  # every sample read from a source shard
        "passed_ingest": ingested_ok,
        "rejected": {"total": rejected_ingest + later_unique,
                     "by_stage": {stage: dict(sorted(c.items())) for stage, c in sorted(by_stage.items())}},
        "filtered": {"kept": kept, "dropped": verdicts.num_rows - kept, "pending": pending_filter},
        "captioned": len(captioned),
        "pending_caption": pending_caption,
        "captioned_unpublished": captioned_unpublished,
        "quarantined": quarantined,
        "published": len(published),
        "in_flight": in_flight,
        "balanced": balanced,
        "shards": {"ingested": len(ledger), "truncated": [e["shard_id"] for e in ledger if e and e.get("truncated")]},
        "last_batch": None if last is None else {"batch_id": last.batch_id, "rows": last.rows,
                                                 "success": last.success, "failed": last.failed,
                                                 "quarantined": last.quarantined,
                                                 "published": last.published, "report": last.report},
        "filter_funnel": funnel(lake),  # per run: rows in, dropped per reason, rows out
        "table_versions": {t: lake.version(t) for t in tables.schemas.TABLES},
    }


def format_status(status: dict) -> str:
    lines = [f"lake {status['lake']}",
             f"  ingested        {status['ingested']:>9}  (passed {status['passed_ingest']}, "
             f"rejected {sum(status['rejected']['by_stage'].get('ingest', {}).values())})",
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
    if status["shards"]["truncated"]:
        lines.append(f"  truncated shards: {', '.join(status['shards']['truncated'])}")
    if status["last_batch"]:
        b = status["last_batch"]
        state = "published" if b["published"] else ("valid, unpublished" if b["success"] else "FAILED validation")
        lines.append(f"  last batch {b['batch_id']}: {b['rows']} rows, {b['quarantined']} quarantined, {state}")
        if b["failed"]:
            lines.append(f"    failed: {', '.join(b['failed'])}")
    lines.append(f"  every row accounted for: {'yes' if status['balanced'] else 'NO'}")
    return "\n".join(lines)
