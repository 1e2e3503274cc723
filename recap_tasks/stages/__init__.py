"""The stages, declared once: their order, what each consumes, and what each keeps a record of.

Everything that needs the stage order reads it here: the local pipeline (`recap run`,
pipeline.STEPS), the CLI's stage verbs, the progress records and pending-work lookups
(`progress.STAGES`, `progress.UPSTREAM`). The Airflow DAGs' task chain (plugins/recap_airflow/
dag_parts.py) is held to it by tests/dags (DAG files import no product code at parse time). This
module imports nothing but the standard library.

A stage works on shards: it finds the shards pending for it (its upstream stage recorded more rows
out than it recorded in), processes them, and, when it `records`, appends one progress record per
shard with that shard's absolute counts (progress.py). `validate` and `report` work on a batch (the
captioned rows of some shards) and keep their own records (the batch file, the report page).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # CLI verb, progress stage, Airflow task id
    help: str  # one line: what it does (CLI help)
    upstream: str | None  # the stage whose recorded output it consumes (None: it reads sources)
    records: bool  # keeps a per-shard progress record
    in_run: bool  # part of `recap run` (download runs before it, on metadata)


STAGES: tuple[Stage, ...] = (
    Stage("download", "download the images of URL metadata (DataComp, LAION parquet or CSV) into webdataset "
                      "shards that ingest reads", None, records=True, in_run=False),
    Stage("ingest", "read source shards into the pairs table; bad samples go to rejected", None,
          records=True, in_run=True),
    Stage("filter", "apply the filter chain to pairs not yet filtered", "ingest", records=True, in_run=True),
    Stage("caption", "caption kept pairs that have no caption yet", "filter", records=True, in_run=True),
    Stage("validate", "run the data-quality suite over captioned, unpublished rows", "caption",
          records=False, in_run=True),
    Stage("publish", "publish the latest validated batch into LAKE/recap (by uid, exactly once)", "caption",
          records=True, in_run=True),
    Stage("report", "write the HTML quality report of --run-id (default: the latest validated) and the index",
          "validate", records=False, in_run=True),
)

BY_NAME = {stage.name: stage for stage in STAGES}
# The stages that keep per-shard progress records, in order, and whose output each consumes.
RECORDED = tuple(stage.name for stage in STAGES if stage.records)
UPSTREAM = {stage.name: stage.upstream for stage in STAGES if stage.records and stage.upstream}
# What `recap run` runs, in order.
RUN = tuple(stage.name for stage in STAGES if stage.in_run)
