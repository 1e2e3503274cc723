"""All stages in order, locally: what `recap run` and the demo do."""

from __future__ import annotations

import logging
from pathlib import Path

from recap_tasks.caption import run_caption
from recap_tasks.config import RecapConfig
from recap_tasks.filtering import run_filter
from recap_tasks.ingest import ingest
from recap_tasks.lake import Lake
from recap_tasks.errors import ValidationFailed
from recap_tasks.publish import run_publish
from recap_tasks.report import build_report
from recap_tasks.runs import new_run_id
from recap_tasks.status import lake_status
from recap_tasks.validate import run_validate

log = logging.getLogger(__name__)


def run_pipeline(sources: list[str], lake: Lake, *, model: str, config: RecapConfig | None = None,
                 run_id: str | None = None) -> dict:
    """ingest -> filter -> caption -> validate -> publish -> report.

    A batch that fails validation is not published; its report is still written, then
    ValidationFailed is raised.
    """
    config = config or RecapConfig.load()
    run_id = run_id or new_run_id()
    lake.write_bytes(f"_runs/{run_id}/config.yaml", config.to_yaml().encode())
    summary: dict = {"run_id": run_id, "lake": lake.uri}
    summary["ingest"] = ingest(sources, lake, config=config.ingest, run_id=run_id).summary()
    summary["filter"] = run_filter(lake, config=config.filter, run_id=run_id).summary()
    summary["caption"] = run_caption(lake, model=model, config=config.caption, run_id=run_id).summary()
    validated = run_validate(lake, config=config.validate, run_id=run_id, raise_on_failure=False)
    summary["validate"] = validated.summary()
    if validated.batch.success:
        summary["publish"] = run_publish(lake, batch_id=run_id, run_id=run_id).summary()
    summary["report"] = build_report(lake, run_id=run_id)
    summary["data_docs"] = summary["validate"]["report"]
    summary["status"] = lake_status(lake)
    summary["published_table"] = lake.path("recap")
    lake.write_json(f"_runs/{run_id}/summary.json", summary)
    if not validated.batch.success:
        raise ValidationFailed(f"batch {run_id} failed validation ({', '.join(validated.batch.failed)}); "
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
    from recap_tasks.captioning.test_model import make_test_model
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
