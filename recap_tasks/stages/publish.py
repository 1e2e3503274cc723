"""Publish stage: a validated batch into `LAKE/recap` by uid (insert, or replace a re-captioned row), exactly once."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import lake as tables
from recap_tasks import progress
from recap_tasks.batches import Batch, all_batches, candidate_rows, read_uids
from recap_tasks.errors import RecapError, ValidationFailed
from recap_tasks.lake import Lake, conform
from recap_tasks.runs import new_run_id, utcnow

log = logging.getLogger(__name__)

APP_ID_PREFIX = "recap-publish:"
BUCKET_APP_ID_PREFIX = "recap-publish-bucket:"


@dataclass
class PublishResult:
    batch_id: str
    rows: int
    inserted: int
    updated: int
    version: int | None
    already_published: bool = False

    def summary(self) -> dict:
        return {"batch_id": self.batch_id, "rows": self.rows, "inserted": self.inserted, "updated": self.updated,
                "table_version": self.version, "already_published": self.already_published}


def run_publish(lake: Lake, *, batch_id: str | None = None, run_id: str | None = None) -> PublishResult:
    """Publish `batch_id` (default: the latest validated batch). Refuses a batch that failed."""
    run_id = run_id or new_run_id()
    batch = _pick(lake, batch_id)
    if not batch.success:
        raise ValidationFailed(f"batch {batch.batch_id} failed validation ({', '.join(batch.failed)}); "
                               f"not published. Fix the cause and run validate again.")
    app_id = APP_ID_PREFIX + batch.batch_id
    lake.ensure(tables.RECAP)
    if lake.committed(tables.RECAP, app_id):
        # The table already records this batch's commit: a retry after a crash, or a repeat.
        version = lake.version(tables.RECAP)
        _mark(lake, batch, version, run_id)
        return PublishResult(batch.batch_id, batch.rows, 0, 0, version, already_published=True)
    rows = candidate_rows(lake, batch.shards, read_uids(lake, batch))
    if rows.num_rows == 0:
        _mark(lake, batch, lake.version(tables.RECAP), run_id)
        return PublishResult(batch.batch_id, 0, 0, 0, lake.version(tables.RECAP))
    now = utcnow()
    rows = rows.append_column("publish_run_id", pa.array([run_id] * rows.num_rows, pa.string()))
    rows = rows.append_column("published_at", pa.array([now] * rows.num_rows, pa.timestamp("us", tz="UTC")))
    schema = tables.schemas.RECAP.arrow
    data = conform(rows.select([c for c in schema.names if c in rows.column_names]), tables.schemas.RECAP)
    metadata = {"recap.batch_id": batch.batch_id, "recap.run_id": run_id}
    # Insert-or-replace by uid, done on the batch's own shards: their published rows are read, the new
    # uids appended (or, when the batch re-captions published uids, those shards' rows overwritten).
    keys = sorted(set(data.column(tables.schemas.SHARD_KEY).to_pylist()))
    # Out of commit retries this raises lake.CommitConflict (one line; nothing was committed).
    inserted, updated = lake.write_once(tables.RECAP, keys, lambda current: _apply(current, data), app_id=app_id,
                                        bucket_prefix=BUCKET_APP_ID_PREFIX, metadata=metadata)
    version = lake.version(tables.RECAP)
    _mark(lake, batch, version, run_id)
    out = PublishResult(batch.batch_id, data.num_rows, inserted, updated, version)
    log.info("publish %s: %s", run_id, out.summary())
    return out


def _apply(current: pa.Table, batch: pa.Table) -> pa.Table:
    """The batch rows to write over `current` (the published rows of its shards): new uids, and
    uids re-captioned since (another caption or model); the same caption again is left as it is."""
    known = pc.is_in(batch.column("uid"), value_set=current.column("uid").combine_chunks())
    new = batch.filter(pc.invert(known))
    seen = batch.filter(known)
    if seen.num_rows == 0:
        return new
    before = current.select(["uid", "re_caption", "model"]).join(
        seen.select(["uid", "re_caption", "model"]).rename_columns(["uid", "new_caption", "new_model"]), "uid")
    changed = pc.or_(pc.not_equal(before.column("re_caption"), before.column("new_caption")),
                     pc.not_equal(before.column("model"), before.column("new_model")))
    changed_uids = before.column("uid").filter(pc.fill_null(changed, True))
    updated = seen.filter(pc.is_in(seen.column("uid"), value_set=changed_uids.combine_chunks()))
    return pa.concat_tables([new, updated])


def _pick(lake: Lake, batch_id: str | None) -> Batch:
    if batch_id:
        batch = Batch.load(lake, batch_id)
        if batch is None:
            raise RecapError(f"no validated batch {batch_id!r} in {lake.uri}; run `recap validate` first")
        return batch
    batches = all_batches(lake)
    if not batches:
        raise RecapError(f"nothing validated in {lake.uri}; run `recap validate` first")
    return batches[-1]


def _mark(lake: Lake, batch: Batch, version: int | None, run_id: str) -> None:
    progress.record(lake, "publish", batch.shards, run_id=run_id)
    batch.published, batch.published_version = True, version
    batch.save(lake)
