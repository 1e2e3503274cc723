"""Publish stage: MERGE a validated batch by uid into `LAKE/recap`, exactly once."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
from deltalake import CommitProperties, Transaction
from deltalake.exceptions import CommitFailedError

from recap_tasks import lake as tables
from recap_tasks import progress as shard_progress
from recap_tasks.batches import Batch, all_batches, candidate_rows, read_uids
from recap_tasks.errors import RecapError, ValidationFailed
from recap_tasks.lake import Lake, _conform
from recap_tasks.runs import new_run_id, utcnow

log = logging.getLogger(__name__)

APP_ID_PREFIX = "recap-publish:"


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
    if lake.delta(tables.RECAP).transaction_version(app_id) is not None:
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
    data = _conform(rows.select([c for c in schema.names if c in rows.column_names]), tables.schemas.RECAP)
    commit = CommitProperties(app_transactions=[Transaction(app_id=app_id, version=1)],
                              custom_metadata={"recap.batch_id": batch.batch_id, "recap.run_id": run_id})
    # Only the partitions of the batch's shards are read and rewritten.
    predicate = f"{lake.partition_predicate(tables.RECAP, data)} AND t.uid = s.uid"

    def attempt(dt):
        if dt.transaction_version(app_id) is not None:
            return {}  # a concurrent publisher of the same batch won
        return (
            dt.merge(data, predicate=predicate, source_alias="s", target_alias="t", commit_properties=commit)
            # A re-captioned uid (new model or prompt) replaces the old row; the same caption does not.
            .when_matched_update_all(predicate="t.re_caption <> s.re_caption OR t.model <> s.model")
            .when_not_matched_insert_all()
            .execute()
        )

    try:
        metrics = lake.commit(tables.RECAP, attempt)
    except CommitFailedError:
        raise RecapError(f"publishing batch {batch.batch_id}: too many concurrent commit conflicts") from None
    inserted = int(metrics.get("num_target_rows_inserted", 0))
    updated = int(metrics.get("num_target_rows_updated", 0))
    version = lake.version(tables.RECAP)
    _mark(lake, batch, version, run_id)
    out = PublishResult(batch.batch_id, data.num_rows, inserted, updated, version)
    log.info("publish %s: %s", run_id, out.summary())
    return out


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
    shard_progress.record(lake, "publish", batch.shards, run_id=run_id)
    batch.published, batch.published_version = True, version
    batch.save(lake)
