"""All stages in order, locally: what `recap run` and the demo do."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from recap_tasks import stages
from recap_tasks.batches import Batch
from recap_tasks.stages.caption import run_caption
from recap_tasks.config import RecapConfig
from recap_tasks.stages.filter import run_filter
from recap_tasks.stages.ingest import ingest
from recap_tasks.lake import Lake
from recap_tasks.errors import ValidationFailed
from recap_tasks.stages.publish import run_publish
from recap_tasks.stages.report import build_report
from recap_tasks.runs import new_run_id
from recap_tasks.status import lake_status
from recap_tasks.stages.validate import ValidateResult, run_validate

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """What one local run's stages share: where, with what, and validate's verdict for the rest."""

    lake: Lake
    config: RecapConfig
    run_id: str
    sources: list[str]
    model: str
    validated: ValidateResult | None = None

    @property
    def batch(self) -> Batch | None:
        return self.validated.batch if self.validated else None


def _ingest(run: _Run) -> dict:
    return ingest(run.sources, run.lake, config=run.config.ingest, run_id=run.run_id).summary()


def _filter(run: _Run) -> dict:
    return run_filter(run.lake, config=run.config.filter, run_id=run.run_id).summary()


def _caption(run: _Run) -> dict:
    return run_caption(run.lake, model=run.model, config=run.config.caption, run_id=run.run_id).summary()


def _validate(run: _Run) -> dict:
    run.validated = run_validate(run.lake, config=run.config.validate, run_id=run.run_id, raise_on_failure=False)
    return run.validated.summary()


def _publish(run: _Run) -> dict | None:
    """A passed batch is published; a refused one, or none (nothing new), is not."""
    if run.batch is None or not run.batch.success:
        return None
    return run_publish(run.lake, batch_id=run.run_id, run_id=run.run_id).summary()


def _report(run: _Run) -> str | None:
    """The batch's report, refused batches too; none without a batch."""
    return None if run.batch is None else build_report(run.lake, run_id=run.run_id)


# How each stage of `recap run` runs locally; the order is recap_tasks.stages.RUN.
STEPS = {"ingest": _ingest, "filter": _filter, "caption": _caption, "validate": _validate, "publish": _publish,
         "report": _report}


def run_pipeline(sources: list[str], lake: Lake, *, model: str, config: RecapConfig | None = None,
                 run_id: str | None = None) -> dict:
    """Every stage of `recap run` in the declared order (recap_tasks.stages): ingest -> filter ->
    caption -> validate -> publish -> report.

    A batch that fails validation is not published; its report is still written, then
    ValidationFailed is raised. With nothing to validate (nothing new captioned) no batch is
    written: `publish`, `report` and `data_docs` are None and `validate["note"]` says so.
    """
    config = config or RecapConfig.load()
    run = _Run(lake, config, run_id or new_run_id(), list(sources), model)
    lake.write_bytes(f"_runs/{run.run_id}/config.yaml", config.to_yaml().encode())
    summary: dict = {"run_id": run.run_id, "lake": lake.uri}
    for name in stages.RUN:
        summary[name] = STEPS[name](run)
    summary["data_docs"] = None if run.batch is None else summary["validate"]["report"]
    summary["status"] = lake_status(lake)
    summary["published_table"] = lake.path("recap")
    lake.write_json(f"_runs/{run.run_id}/summary.json", summary)
    if run.batch is not None and not run.batch.success:
        raise ValidationFailed(f"batch {run.run_id} failed validation ({', '.join(run.batch.failed)}); "
                               f"nothing published. Report: {summary['report']}")
    return summary


# The tiny random model writes random English words; fastText's English score on them is noise,
# so the demo runs with the language gate off. Everything else is the production default.
DEMO_CONFIG = """\
filter:
  chain: datacomp
  clip_model: {clip}
  min_clip_score: -1.0
caption:
  clip_model: {clip}
validate:
  require_english: false
"""


def run_demo(workdir: str | Path) -> dict:
    """Sample shards + tiny offline model -> a published table under `workdir/lake`."""
    from recap_tasks.captioning.tiny_model import make_test_model
    from recap_tasks.sample_data import make_sample_data

    work = Path(workdir).resolve()
    data = make_sample_data(work / "sample-shards")
    model = work / "tiny-llava"
    if not (model / "config.json").exists():
        make_test_model(model)
    clip = model / "clip"
    if not (clip / "config.json").exists():
        from recap_tasks.filters.clip import make_test_clip_model

        make_test_clip_model(clip)
    config_file = work / "demo-config.yaml"
    config_file.write_text(DEMO_CONFIG.format(clip=clip))
    return run_pipeline([str(data)], Lake(work / "lake"), model=str(model), config=RecapConfig.load(config_file))
