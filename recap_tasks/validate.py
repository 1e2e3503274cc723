"""Validate stage: a Great Expectations suite over the captioned rows about to be published."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import pandas as pd

from recap_tasks.batches import Batch, candidate_rows, write_uids
from recap_tasks.config import ValidateConfig
from recap_tasks.errors import ValidationFailed
from recap_tasks.lake import Lake
from recap_tasks.runs import new_run_id, utcnow

log = logging.getLogger(__name__)

SITE = "recap_data_docs"  # the ephemeral context already has a site named local_site


@dataclass
class ValidateResult:
    batch: Batch
    results: list[dict]

    def summary(self) -> dict:
        return {"batch_id": self.batch.batch_id, "rows": self.batch.rows, "success": self.batch.success,
                "failed": self.batch.failed, "report": self.batch.report}


def build_suite(config: ValidateConfig):
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name="recap_batch")
    for column in ("uid", "re_caption", "org_caption", "sha256", "key", "model"):
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=column))
    suite.add_expectation(E.ExpectColumnValuesToBeUnique(column="uid"))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(
        column="re_length", min_value=config.min_caption_words, max_value=config.max_caption_words))
    suite.add_expectation(E.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"))
    return suite


def run_validate(lake: Lake, *, config: ValidateConfig | None = None, run_id: str | None = None,
                 raise_on_failure: bool = True) -> ValidateResult:
    """Check every captioned, unpublished row; record the batch; raise ValidationFailed if it fails."""
    config = config or ValidateConfig()
    run_id = run_id or new_run_id()
    rows = candidate_rows(lake)
    batch = Batch(batch_id=run_id, rows=rows.num_rows, success=True, validated_at=utcnow().isoformat())
    write_uids(lake, batch, rows.column("uid").combine_chunks())
    results: list[dict] = []
    if rows.num_rows:
        results, report = _run_suite(rows.to_pandas(), config, lake, run_id)
        batch.failed = [r["expectation"] for r in results if not r["success"]]
        batch.success = not batch.failed
        batch.report = report
    batch.save(lake)
    out = ValidateResult(batch, results)
    log.info("validate %s: %s", run_id, out.summary())
    if not batch.success and raise_on_failure:
        details = "; ".join(f"{r['expectation']}: {r['observed']}" for r in results if not r["success"])
        raise ValidationFailed(f"batch {run_id} ({rows.num_rows} rows) failed validation, not publishable: {details}")
    return out


def _run_suite(df: pd.DataFrame, config: ValidateConfig, lake: Lake, run_id: str) -> tuple[list[dict], str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import great_expectations as gx

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
        docs_dir = lake.local_dir("_reports/data_docs")
        context.add_data_docs_site(site_name=SITE, site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        asset = context.data_sources.add_pandas("recap").add_dataframe_asset("batch")
        batch_definition = asset.add_batch_definition_whole_dataframe(run_id)
        suite = context.suites.add(build_suite(config))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate-{run_id}", data=batch_definition, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"recap-{run_id}", validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[SITE])],
            result_format={"result_format": "SUMMARY"}))
        outcome = checkpoint.run(batch_parameters={"dataframe": df})
    results = []
    for validation in outcome.run_results.values():
        for r in validation.results:
            cfg = r.expectation_config
            column = cfg.kwargs.get("column")
            observed = r.result.get("unexpected_percent", r.result.get("observed_value"))
            results.append({"expectation": f"{cfg.type}({column})" if column else cfg.type,
                            "success": bool(r.success), "observed": observed,
                            "unexpected_count": r.result.get("unexpected_count")})
    pages = sorted(docs_dir.glob("validations/**/*.html"))
    report = str(docs_dir / "index.html") if not pages else str(max(pages, key=lambda p: p.stat().st_mtime))
    return results, report
