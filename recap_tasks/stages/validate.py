"""Validate stage: Great Expectations quality gates over the captioned rows about to be published.

Row-level expectations (length, refusals, prompt echoes, repetition, language, CLIP range) each
carry a batch-level `mostly`: rows that fail any of them are quarantined; a batch where more rows
fail than `mostly` allows, or an aggregate check fails (unique uid, schema, CLIP collapse,
quarantine share, row-count reconciliation: `recap status --verify`'s check of the batch's shards),
is refused: nothing is published or quarantined.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recap_tasks import lake as tables
from recap_tasks import schemas
from recap_tasks import progress
from recap_tasks.batches import Batch, candidate_rows, recorded_ids, write_uids
from recap_tasks.config import RecapConfig, ValidateConfig
from recap_tasks.errors import ValidationFailed
from recap_tasks.filters.language import english_scorer
from recap_tasks.hygiene import distinct_ngram_ratio, echoes_prompt, is_refusal
from recap_tasks.lake import Lake, conform, insert_prefix, not_in
from recap_tasks.ids import shard_key
from recap_tasks.runs import new_run_id, utcnow

log = logging.getLogger(__name__)

SITE = "recap_data_docs"  # the ephemeral context already has a site named local_site

PUBLISHED_COLUMNS = ["url", "re_caption", "org_caption", "sha256", "key", "re_clip_score", "org_clip_score",
                     "re_length", "org_length", "uid"]


@dataclass
class ValidateResult:
    batch: Batch | None  # None: nothing to check, no batch written
    results: list[dict]
    quarantined: int
    note: str = ""  # why there is no batch

    def summary(self) -> dict:
        if self.batch is None:
            return {"batch_id": None, "rows": 0, "nothing_to_validate": True, "note": self.note}
        return {"batch_id": self.batch.batch_id, "rows": self.batch.rows, "success": self.batch.success,
                "failed": self.batch.failed, "quarantined": self.quarantined, "report": self.batch.report}


def row_checks(df: pd.DataFrame, config: ValidateConfig) -> pd.DataFrame:
    """Derived columns the expectations read: hygiene flags, language, CLIP delta."""
    captions = df["re_caption"].fillna("")
    prompts = df["prompt"].fillna("")
    out = df.copy()
    out["is_refusal"] = [bool(f) if f is not None and not pd.isna(f) else is_refusal(c)
                         for f, c in zip(df["is_refusal"], captions)]
    out["prompt_echo"] = [bool(f) if f is not None and not pd.isna(f) else echoes_prompt(c, p)
                          for f, c, p in zip(df["prompt_echo"], captions, prompts)]
    out["distinct_ngram_ratio"] = [float(r) if r is not None and not pd.isna(r) else distinct_ngram_ratio(c)
                                   for r, c in zip(df["distinct_ngram_ratio"], captions)]
    if config.require_english:
        out["re_english_score"] = english_scorer().english_scores(captions.tolist())
    out["clip_delta"] = (df["re_clip_score"].astype("float64") - df["org_clip_score"].astype("float64"))
    return out


def build_suite(config: ValidateConfig, *, clip_scored: bool = True):
    """The expectation suite, and for each row-level expectation the rows it fails.

    Returns (suite, {expectation name: fails(df) -> boolean Series}). GX decides each
    expectation's verdict (with its `mostly`); the masks say which rows to quarantine, and their
    counts are checked against GX's unexpected counts. Without CLIP scores in the batch (no scorer
    configured) the CLIP expectations are left out.
    """
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name="recap_batch")
    row_rules: dict[str, Callable[[pd.DataFrame], pd.Series]] = {}

    def add(expectation, fails=None) -> None:
        suite.add_expectation(expectation)
        if fails is not None:
            row_rules[_name(expectation.expectation_type, expectation.column)] = fails

    def outside(column: str, low=None, high=None):
        def fails(df: pd.DataFrame) -> pd.Series:
            values = pd.to_numeric(df[column], errors="coerce")
            bad = pd.Series(False, index=df.index)
            if low is not None:
                bad |= values < low
            if high is not None:
                bad |= values > high
            return bad & values.notna()  # GX's column-map expectations skip nulls
        return fails

    q = 1 - config.max_quarantine_fraction
    # Aggregate: schema, identity.
    add(E.ExpectTableColumnsToMatchSet(column_set=PUBLISHED_COLUMNS, exact_match=False))
    add(E.ExpectColumnValuesToBeUnique(column="uid"))
    for column in ("uid", "org_caption", "sha256", "key", "model"):
        add(E.ExpectColumnValuesToNotBeNull(column=column))
    add(E.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"))
    # Row level (quarantine), each with its batch-level tolerance.
    add(E.ExpectColumnValuesToNotBeNull(column="re_caption", mostly=q), lambda df: df["re_caption"].isna())
    add(E.ExpectColumnValuesToBeBetween(column="re_length", min_value=config.min_caption_words,
                                        max_value=config.max_caption_words, mostly=q),
        outside("re_length", config.min_caption_words, config.max_caption_words))
    add(E.ExpectColumnValuesToBeInSet(column="is_refusal", value_set=[False],
                                      mostly=1 - config.max_refusal_fraction),
        lambda df: df["is_refusal"] == True)  # noqa: E712 (a pandas mask)
    add(E.ExpectColumnValuesToBeInSet(column="prompt_echo", value_set=[False],
                                      mostly=1 - config.max_prompt_echo_fraction),
        lambda df: df["prompt_echo"] == True)  # noqa: E712
    add(E.ExpectColumnValuesToBeBetween(column="distinct_ngram_ratio", min_value=config.min_distinct_ngram_ratio,
                                        mostly=1 - config.max_degenerate_fraction),
        outside("distinct_ngram_ratio", low=config.min_distinct_ngram_ratio))
    if config.require_english:
        add(E.ExpectColumnValuesToBeBetween(column="re_english_score", min_value=config.min_english_score,
                                            mostly=1 - config.max_non_english_fraction),
            outside("re_english_score", low=config.min_english_score))
    if clip_scored:
        for column in ("re_clip_score", "org_clip_score"):
            add(E.ExpectColumnValuesToNotBeNull(column=column, mostly=q), lambda df, c=column: df[c].isna())
            add(E.ExpectColumnValuesToBeBetween(column=column, min_value=-1.0, max_value=1.0, mostly=q),
                outside(column, -1.0, 1.0))
        # Aggregate: the recaption must not align worse with the image than the alt text did.
        add(E.ExpectColumnMeanToBeBetween(column="clip_delta", min_value=-config.max_clip_drop))
    return suite, row_rules


def _name(expectation_type: str, column: str | None) -> str:
    return f"{expectation_type}({column})" if column else expectation_type


def run_validate(lake: Lake, *, config: ValidateConfig | None = None, run_id: str | None = None,
                 raise_on_failure: bool = True, shard_ids: list[str] | None = None) -> ValidateResult:
    """Check the captioned rows of `shard_ids` (default: every shard with captioned rows not yet
    published or quarantined, from the progress records); record the batch and its verdict.

    With no such rows nothing is written: no batch (an empty one would become the lake's latest
    batch and be listed in reports); the result's `batch` is None and `note` says why."""
    config = config or RecapConfig.load().validate
    run_id = run_id or new_run_id()
    started = utcnow()  # quarantine rows of unrecorded batches older than this are adopted
    if shard_ids is not None:
        progress.require_known(lake, shard_ids)
    targets = sorted(set(shard_ids)) if shard_ids is not None else progress.pending_shards(lake, "publish")
    rows = candidate_rows(lake, targets)
    if rows.num_rows == 0:
        where = lake.uri if shard_ids is None else \
            f"shard {targets[0]}" if len(targets) == 1 else f"{len(targets)} shards ({targets[0]}, ...)"
        note = f"nothing to validate in {where}: no captioned rows wait for publishing; no batch written"
        log.info("validate %s: %s", run_id, note)
        return ValidateResult(None, [], 0, note=note)
    batch = Batch(batch_id=run_id, rows=rows.num_rows, success=True, validated_at=utcnow().isoformat(),
                  shards=sorted(set(rows.column("shard_id").to_pylist())))
    df = row_checks(rows.to_pandas(), config)
    with lake.staged_dir("_reports/data_docs") as docs_dir:
        results, quarantine, page = check_frame(df, config, name=run_id, docs_dir=docs_dir)
    report = page if lake.is_local or page is None else \
        f"{lake.uri}/_reports/data_docs/{Path(page).relative_to(docs_dir).as_posix()}"
    reconciliation = _reconcile(lake, batch.shards, rows.num_rows, len(quarantine))
    results.append(reconciliation)
    batch.failed = [r["expectation"] for r in results if not r["success"]]
    batch.results = results
    batch.success = not batch.failed
    batch.report = report
    batch.quarantined = len(quarantine)
    if batch.success:
        adopted = _write_quarantine(lake, rows, quarantine, run_id, batch.shards, before=started)
        # Adopted rows count as this batch's, checked and quarantined, as in the run that died.
        batch.rows += adopted
        batch.quarantined += adopted
    publishable = [u for u in rows.column("uid").to_pylist() if u not in quarantine]
    write_uids(lake, batch, pa.array(publishable, pa.string()))
    batch.save(lake)
    out = ValidateResult(batch, results, batch.quarantined if batch.success else 0)
    log.info("validate %s: %s", run_id, out.summary())
    if not batch.success and raise_on_failure:
        details = "; ".join(f"{r['expectation']}: {r.get('detail') or r['observed']}" for r in results
                            if not r["success"])
        raise ValidationFailed(f"batch {run_id} ({rows.num_rows} rows) failed validation, not publishable: {details}")
    return out


def check_frame(df: pd.DataFrame, config: ValidateConfig, *, name: str = "batch", docs_dir: Path | None = None):
    """Run the suite over a prepared frame (see row_checks).

    Returns (results, {uid: [failed row-level expectations]}, Data Docs page or None).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import great_expectations as gx

        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
        actions = []
        if docs_dir is not None:
            context.add_data_docs_site(site_name=SITE, site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            })
            actions.append(gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[SITE]))
        asset = context.data_sources.add_pandas("recap").add_dataframe_asset("batch")
        batch_definition = asset.add_batch_definition_whole_dataframe(name)
        clip_scored = bool(df["re_clip_score"].notna().any() or df["org_clip_score"].notna().any())
        suite, row_rules = build_suite(config, clip_scored=clip_scored)
        suite = context.suites.add(suite)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate-{name}", data=batch_definition, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"recap-{name}", validation_definitions=[definition], actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5}))
        outcome = checkpoint.run(batch_parameters={"dataframe": df})
    results: list[dict] = []
    quarantine: dict[str, list[str]] = {}
    uids = df["uid"].to_numpy()
    for validation in outcome.run_results.values():
        for r in validation.results:
            cfg = r.expectation_config
            name = _name(cfg.type, cfg.kwargs.get("column"))
            observed = r.result.get("unexpected_percent", r.result.get("observed_value"))
            count = r.result.get("unexpected_count")
            results.append({"expectation": name, "success": bool(r.success), "observed": _plain(observed),
                            "unexpected_count": count, "row_level": name in row_rules})
            if name in row_rules:
                failing = uids[row_rules[name](df).to_numpy(dtype=bool)]
                if count is not None and len(failing) != count:
                    raise AssertionError(f"{name}: GX counts {count} failing rows, the row rule {len(failing)}")
                for uid in failing:
                    quarantine.setdefault(uid, []).append(name)
    report = None
    if docs_dir is not None:
        offline_data_docs(docs_dir)
        pages = sorted(docs_dir.glob("validations/**/*.html"))
        report = str(docs_dir / "index.html") if not pages else str(max(pages, key=lambda p: p.stat().st_mtime))
    return results, quarantine, report


def _reconcile(lake: Lake, shard_ids: list[str], batch_rows: int, quarantined: int) -> dict:
    """On the batch's shards, uid by uid, what `recap status --verify` checks: every ingested row is
    published, rejected, quarantined or still in flight, exactly once; no table holds fewer rows
    than its stage recorded or a uid twice; every uid of a published batch is still published.
    A failure refuses the batch; `detail` names each shard and the kind of loss, in one line."""
    from recap_tasks.status import verify

    verified = verify(lake, shard_ids)
    problems = [f"{p['kind']} in {p['table']}, shard {p['shard']}: {p['detail']}"  # per shard first
                for p in sorted(verified["problems"], key=lambda p: p["kind"] == "unbalanced")]
    return {"expectation": "row_count_reconciliation", "success": verified["ok"], "row_level": False,
            "observed": {**{k: v for k, v in verified["places"].items() if k != "balanced"},
                         "batch_rows": batch_rows, "batch_quarantined": quarantined, "problems": problems},
            "detail": "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""),
            "unexpected_count": None}


def _write_quarantine(lake: Lake, rows: pa.Table, quarantine: dict[str, list[str]], batch_id: str,
                      shard_ids: list[str], *, before) -> int:
    """Insert the batch's quarantined rows (uids not in quarantine yet) on its shards, and adopt the
    rows there that a validate killed before its batch record left behind; returns rows adopted.

    Such a row names a batch that was never recorded: the dead run's quarantine commit landed, its
    batch record did not, and the rerun (which no longer sees those rows: they are settled) would
    count fewer quarantined than a clean run. Adopting re-labels them with this batch's id. One
    commit for both (`Lake.update_shards`, with the bucket app transactions `insert_new` uses), so a
    concurrent writer of these shards' quarantine rows (another validate) makes it retry against
    the winner's rows: a row is never lost or written twice. Only rows quarantined `before` this
    validate started are adopted: a validate running alongside, between its quarantine commit and
    its batch record, quarantined its rows after that (hosts' clocks assumed within the time a
    validate takes to check its rows). Rows already carrying this batch's id from before it started
    (a dead run retried under the same id) are counted as they are."""
    bad = rows.filter(pc.is_in(rows.column("uid"), value_set=pa.array(list(quarantine), pa.string())))
    now = utcnow()
    fresh = conform(pa.table({
        "uid": bad.column("uid"), "key": bad.column("key"), "shard_id": bad.column("shard_id"),
        "batch_id": pa.array([batch_id] * bad.num_rows, pa.string()),
        "failed": pa.array([sorted(set(quarantine[u])) for u in bad.column("uid").to_pylist()],
                           pa.list_(pa.string())),
        "re_caption": bad.column("re_caption"), "model": bad.column("model"),
        "quarantined_at": pa.array([now] * bad.num_rows, pa.timestamp("us", tz="UTC")),
    }), schemas.QUARANTINE)
    keys = sorted({shard_key(s) for s in shard_ids})
    if not keys:
        return 0
    lake.ensure(tables.QUARANTINE)
    recorded: set[str] = {batch_id}  # batch ids known to have a record (never un-recorded)

    def unrecorded(ids: list[str]) -> set[str]:
        if set(ids) - recorded:  # one listing of the batch records, not one read per batch id
            recorded.update(recorded_ids(lake))
        return {b for b in ids if b not in recorded}

    def change(current: pa.Table):
        ids = current.column("batch_id")
        earlier = pc.fill_null(pc.less(current.column("quarantined_at"),
                                       pa.scalar(before, pa.timestamp("us", tz="UTC"))), False)
        # This batch's id on rows from before it started: a dead run of the same id (a retry).
        own = pc.and_(pc.fill_null(pc.equal(ids, batch_id), False), earlier)
        orphans = unrecorded(pc.unique(ids).drop_null().to_pylist()) if current.num_rows else set()
        relabel = pc.and_(pc.fill_null(pc.is_in(ids, value_set=pa.array(sorted(orphans), pa.string())), False),
                          earlier)
        relabelled, adopted = pc.sum(relabel).as_py() or 0, pc.sum(own).as_py() or 0
        new = fresh.filter(not_in(fresh.column("uid"), current.column("uid").combine_chunks()))
        if relabelled == 0:
            return None, new, (adopted, 0, orphans)
        index = current.schema.get_field_index("batch_id")
        kept = current.set_column(index, current.schema.field(index),
                                  pc.if_else(relabel, pa.scalar(batch_id, pa.string()), ids))
        return kept, new, (adopted, relabelled, orphans)

    adopted, relabelled, orphans = lake.update_shards(
        tables.QUARANTINE, keys, change, bucket_prefix=insert_prefix(tables.QUARANTINE),
        metadata={"recap.batch_id": batch_id})
    if relabelled:
        log.info("validate %s: adopted %d quarantine rows of the unrecorded batches %s", batch_id, relabelled,
                 ", ".join(sorted(orphans)))
    return adopted + relabelled


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


# Data Docs without a network: GX's pages load Bootstrap, jQuery, bootstrap-table, Font Awesome and
# Vega from public CDNs, and its logo from S3; none of them ships in the great_expectations package
# (only its own styles, fonts and images, which the site builder copies to static/). On an offline
# cluster those fetches hang and the page renders unstyled, with an empty index. So every page is
# rewritten to use what the lake holds: the external tags go, a small stylesheet (the Bootstrap
# classes GX's pages use) and a small script (the jQuery/bootstrap-table calls they make: tables
# from their data, tabs, collapse) are written to static/recap/, the logo comes from static/images.
_EXTERNAL_TAG = re.compile(r"""<(?:link|script)\b[^>]*\b(?:href|src)=["']https?://[^>]*>(?:\s*</script>)?""", re.I)
_EXTERNAL_IMG = re.compile(r"""(<img\b[^>]*\bsrc=)["']https?://[^"']*logo-long\.png[^"']*["']""", re.I | re.S)
_OFFLINE_MARK = "static/recap/offline.css"

_OFFLINE_CSS = """
*,::after,::before{box-sizing:border-box}
body{margin:0;font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;font-size:1rem;
 line-height:1.5;color:#212529;background:#fff}
a{color:#007bff;text-decoration:none}a:hover{text-decoration:underline}
h1,h2,h3,h4,h5,h6,.h1,.h2,.h3,.h4,.h5,.h6{margin:0 0 .5rem;font-weight:500;line-height:1.2}
h1,.h1{font-size:2.2rem}h2,.h2{font-size:1.8rem}h3,.h3{font-size:1.5rem}h4,.h4{font-size:1.3rem}
h5,.h5{font-size:1.1rem}h6,.h6{font-size:1rem}p{margin:0 0 1rem}
.container,.container-fluid{width:100%;padding-right:15px;padding-left:15px;margin-right:auto;margin-left:auto}
.row{display:flex;flex-wrap:wrap;margin-right:-15px;margin-left:-15px}
[class*="col-"],.col{position:relative;width:100%;padding-right:15px;padding-left:15px}
.col-12{flex:0 0 100%;max-width:100%}.col-6{flex:0 0 50%;max-width:50%}
@media(min-width:768px){.col-md-2{flex:0 0 16.66%;max-width:16.66%}.col-md-3{flex:0 0 25%;max-width:25%}
 .col-md-4{flex:0 0 33.33%;max-width:33.33%}.col-md-6{flex:0 0 50%;max-width:50%}.col-md-8{flex:0 0 66.66%;max-width:66.66%}
 .col-md-9{flex:0 0 75%;max-width:75%}.col-md-10{flex:0 0 83.33%;max-width:83.33%}.col-md-12{flex:0 0 100%;max-width:100%}}
@media(min-width:992px){.col-lg-2{flex:0 0 16.66%;max-width:16.66%}.col-lg-10{flex:0 0 83.33%;max-width:83.33%}}
.table{width:100%;margin-bottom:1rem;border-collapse:collapse}
.table td,.table th,table.table-sm td,table.table-sm th{padding:.3rem .5rem;vertical-align:top;border-top:1px solid #dee2e6;text-align:left}
.table thead th{border-bottom:2px solid #dee2e6}.table-responsive{display:block;width:100%;overflow-x:auto}
.badge{display:inline-block;padding:.25em .4em;font-size:75%;font-weight:700;line-height:1;border-radius:.25rem;
 white-space:nowrap}
.badge-secondary{color:#fff;background:#6c757d}.badge-info{color:#fff;background:#17a2b8}
.badge-danger{color:#fff;background:#dc3545}.badge-success{color:#fff;background:#28a745}
.alert{position:relative;padding:.5rem 1rem;margin-bottom:1rem;border:1px solid transparent;border-radius:.25rem}
.alert-secondary{color:#383d41;background:#e2e3e5;border-color:#d6d8db}
.alert-danger{color:#721c24;background:#f8d7da}.alert-success{color:#155724;background:#d4edda}
.card{position:relative;display:flex;flex-direction:column;min-width:0;background:#fff;border:1px solid rgba(0,0,0,.125);
 border-radius:.25rem;margin-bottom:1rem}
.card-header{padding:.75rem 1.25rem;background:rgba(0,0,0,.03);border-bottom:1px solid rgba(0,0,0,.125)}
.card-body{flex:1 1 auto;padding:1rem 1.25rem}
.navbar{position:relative;display:flex;flex-wrap:wrap;align-items:center;justify-content:space-between;padding:.5rem 1rem;
 background:#fff}
.navbar-brand{display:inline-block;margin-right:1rem}
.nav{display:flex;flex-wrap:wrap;padding-left:0;margin-bottom:0;list-style:none}.nav-link{display:block;padding:.4rem .8rem}
.nav-pills .nav-link.active{color:#fff;background:#007bff;border-radius:.25rem}
.flex-column{flex-direction:column!important}
.tab-content>.tab-pane{display:none}.tab-content>.active{display:block}
.collapse:not(.show){display:none}
.breadcrumb{display:flex;flex-wrap:wrap;padding:.5rem 1rem;margin-bottom:1rem;list-style:none;background:#e9ecef;border-radius:.25rem}
.breadcrumb-item+.breadcrumb-item::before{display:inline-block;padding:0 .5rem;color:#6c757d;content:"/"}
.btn{display:inline-block;font-weight:400;text-align:center;border:1px solid transparent;padding:.3rem .7rem;
 font-size:.9rem;border-radius:.25rem;cursor:pointer;background:#f8f9fa}
.btn-primary{color:#fff;background:#007bff}.btn-secondary{color:#fff;background:#6c757d}.btn-sm{font-size:.8rem}
.list-group{display:flex;flex-direction:column;padding-left:0;margin-bottom:0}
.list-group-item{display:block;padding:.5rem 1rem;border:1px solid rgba(0,0,0,.125)}
.sticky-top{position:sticky;top:0;z-index:1020}.border-bottom{border-bottom:1px solid #dee2e6!important}
.d-none{display:none!important}.d-flex{display:flex!important}.d-block{display:block!important}
@media(min-width:576px){.d-sm-block{display:block!important}}
.float-left{float:left}.float-right{float:right}.align-items-center{align-items:center}
.justify-content-between{justify-content:space-between}.w-100{width:100%}.h-100{height:100%}
.rounded{border-radius:.25rem}.bg-light{background:#f8f9fa!important}.shadow-sm{box-shadow:0 .1rem .25rem rgba(0,0,0,.08)}
.text-success{color:#28a745!important}.text-danger{color:#dc3545!important}.text-muted{color:#6c757d!important}
.text-center{text-align:center}.text-right{text-align:right}
.m-0{margin:0!important}.mt-0{margin-top:0!important}.mb-0{margin-bottom:0!important}.mr-0{margin-right:0!important}
.mt-1{margin-top:.25rem!important}.mb-1{margin-bottom:.25rem!important}.ml-1{margin-left:.25rem!important}
.mr-1{margin-right:.25rem!important}.mt-2{margin-top:.5rem!important}.mb-2{margin-bottom:.5rem!important}
.ml-2{margin-left:.5rem!important}.mr-2{margin-right:.5rem!important}.mb-3{margin-bottom:1rem!important}
.mb-4{margin-bottom:1.5rem!important}.mr-auto{margin-right:auto!important}
.p-0{padding:0!important}.p-1{padding:.25rem!important}.p-2{padding:.5rem!important}.p-3{padding:1rem!important}
.px-0{padding-left:0!important;padding-right:0!important}.pt-0{padding-top:0!important}.pb-0{padding-bottom:0!important}
.pb-1{padding-bottom:.25rem!important}.pt-4{padding-top:1.5rem!important}.pb-4{padding-bottom:1.5rem!important}
.pl-5{padding-left:3rem!important}.pr-5{padding-right:3rem!important}.pr-3{padding-right:1rem!important}
@media(min-width:576px){.pl-sm-3{padding-left:1rem!important}}
@media(min-width:768px){.pl-md-4{padding-left:1.5rem!important}.pr-md-3{padding-right:1rem!important}}
.fas,.far,.fa{font-style:normal}.fa-check-circle::before{content:"\\2714";color:#28a745}
.fa-times::before,.fa-times-circle::before{content:"\\2718";color:#dc3545}
.fa-exclamation-triangle::before{content:"\\26A0"}.fa-info-circle::before{content:"\\2139"}
.ge-walkthrough-modal,.modal{display:none}
tr.clickable-row{cursor:pointer}tr.clickable-row:hover{background:#f1f3f5}
"""

_OFFLINE_JS = """
(function () {
  // The few jQuery / Bootstrap / bootstrap-table calls Great Expectations' pages make, without them.
  function render(table, opts) {
    var cols = (opts.columns || []).filter(function (c) { return c.visible !== false && c.visible !== 'false'; });
    var head = '<thead><tr>' + cols.map(function (c) { return '<th>' + (c.title || '') + '</th>'; }).join('') +
      '</tr></thead>';
    var rows = (opts.data || []).map(function (row) {
      var link = row._table_row_link_path;
      return '<tr' + (link ? ' class="clickable-row" data-href="' + link + '"' : '') + '>' +
        cols.map(function (c) { var v = row[c.field]; return '<td>' + (v == null ? '' : v) + '</td>'; }).join('') +
        '</tr>';
    });
    table.classList.add('table');
    table.innerHTML = head + '<tbody>' + rows.join('') + '</tbody>';
    table.querySelectorAll('tr[data-href]').forEach(function (tr) {
      tr.addEventListener('click', function () { window.location = tr.getAttribute('data-href'); });
    });
  }
  function wrap(els) {
    var api = {
      bootstrapTable: function (opts) { if (opts && typeof opts === 'object') els.forEach(function (t) { render(t, opts); }); return proxy; },
      ready: function (fn) { if (document.readyState !== 'loading') fn(); else document.addEventListener('DOMContentLoaded', fn); return proxy; },
      fadeIn: function () { els.forEach(function (e) { e.style.display = ''; }); return proxy; },
      fadeOut: function () { els.forEach(function (e) { e.style.display = 'none'; }); return proxy; },
      parent: function () { return wrap(els.map(function (e) { return e.parentElement; }).filter(Boolean)); },
      removeClass: function (c) { els.forEach(function (e) { e.classList && e.classList.remove(c); }); return proxy; },
      addClass: function (c) { els.forEach(function (e) { e.classList && e.classList.add(c); }); return proxy; }
    };
    var proxy = new Proxy(api, { get: function (t, k) { return k in t ? t[k] : function () { return proxy; }; } });
    return proxy;
  }
  window.$ = window.jQuery = function (sel) {
    if (typeof sel === 'function') return wrap([document]).ready(sel);
    if (typeof sel === 'string') { try { return wrap(Array.from(document.querySelectorAll(sel))); } catch (e) { return wrap([]); } }
    return wrap(sel ? [sel] : []);
  };
  document.addEventListener('click', function (ev) {
    var a = ev.target.closest && ev.target.closest('[data-toggle="tab"],[data-toggle="collapse"]');
    if (!a) return;
    var id = a.getAttribute('href') || a.getAttribute('data-target');
    var target = id && id.charAt(0) === '#' ? document.getElementById(id.slice(1)) : null;
    if (!target) return;
    ev.preventDefault();
    if (a.getAttribute('data-toggle') === 'collapse') { target.classList.toggle('show'); return; }
    Array.from(target.parentElement.children).forEach(function (p) { p.classList.remove('active', 'show'); });
    target.classList.add('active', 'show');
    var nav = a.closest('.nav');
    if (nav) nav.querySelectorAll('[data-toggle="tab"]').forEach(function (t) { t.classList.remove('active'); });
    a.classList.add('active');
  });
})();
"""


def offline_data_docs(docs_dir: Path) -> None:
    """Make the Data Docs site under `docs_dir` self-contained (see _OFFLINE_CSS): no http(s) fetches."""
    assets = docs_dir / "static" / "recap"
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "offline.css").write_text(_OFFLINE_CSS.lstrip(), encoding="utf-8")
    (assets / "offline.js").write_text(_OFFLINE_JS.lstrip(), encoding="utf-8")
    for page in docs_dir.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        root = "../" * (len(page.relative_to(docs_dir).parts) - 1)
        fixed = _EXTERNAL_TAG.sub("", text)
        fixed = re.sub(r"url\(\s*['\"]?https?://[^)]*\)", "none", fixed)  # a dark-mode logo from S3
        fixed = _EXTERNAL_IMG.sub(lambda m: f'{m.group(1)}"{root}static/images/logo-long.png"', fixed)
        if _OFFLINE_MARK not in fixed:
            fixed = re.sub(r"<head>", f'<head>\n<link rel="stylesheet" href="{root}{_OFFLINE_MARK}">\n'
                                      f'<script src="{root}static/recap/offline.js"></script>', fixed, count=1)
        if fixed != text:
            page.write_text(fixed, encoding="utf-8")
