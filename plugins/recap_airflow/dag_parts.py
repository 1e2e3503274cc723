"""The recaption stages as Airflow tasks, shared by the manual and the incremental DAG.

Call `recaption_stages(chunks)` inside a DAG whose params hold `lake`, `model`, `batch_size`,
`filter_profile` and `runner`. Task bodies import recap_tasks lazily: parsing a DAG file
imports only Airflow, this module and the Kubernetes client models.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import Asset, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from recap_airflow.pods import GPU_POOL, CaptionRunnerFactory
from recap_airflow.runners import RUNNERS
from recap_airflow.stages import CONFIG_PROFILE, FILTER_PROFILES

DEFAULT_LAKE = os.environ.get("RECAP_LAKE", os.path.expanduser("~/recap-lake"))
DEFAULT_MODEL = os.environ.get("RECAP_MODEL", "")
DEFAULT_RUNNER = os.environ.get("RECAP_RUNNER", "local")
# What the source field names: shards with images, or image-URL metadata to download first.
SOURCE_KINDS = ("shards", "metadata")

# The published Delta table; its asset events carry {"lake", "run_id", "rows"} in `extra`.
PUBLISHED = Asset(name="recap_published", uri=f"file://{DEFAULT_LAKE}/recap", group="recap")

def log_failure_last(context) -> None:
    """A failed task's log ends with its one-line error: Airflow logs the traceback of the failure,
    then runs this callback (in the task's process), so the line a user reads last says what went
    wrong and what to do (issue 23)."""
    import logging

    exc = context.get("exception")
    if exc is not None:
        logging.getLogger("recap").error("recap: error: %s", " ".join(str(exc).split())[:1500])


DEFAULT_ARGS = {
    "owner": "recap",
    "on_failure_callback": log_failure_last,
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "execution_timeout": timedelta(hours=2),
}


def common_params(*, scheduled: bool = False) -> dict[str, Param]:
    """Form fields every recaption DAG shares (the source field differs per DAG).

    A scheduled DAG needs valid defaults, so there an unset model is checked when a run starts.
    """
    runner = DEFAULT_RUNNER if DEFAULT_RUNNER in RUNNERS else "local"
    return {
        "source_kind": Param("shards", enum=list(SOURCE_KINDS), title="Source kind",
                             description="shards: webdataset .tar or .parquet with images; metadata: a metadata "
                                         "parquet/CSV of image URLs (DataComp, LAION), downloaded first"),
        "lake": Param(DEFAULT_LAKE, type="string", minLength=1, title="Lake",
                      description="Lake root folder; for runner=kubernetes a path on the shared lake volume"),
        "model": Param(DEFAULT_MODEL, type="string", minLength=0 if scheduled else 1, title="Captioning model",
                       description="Model id (e.g. llava-hf/llava-1.5-7b-hf) or a local folder"),
        # Left at their defaults, these two keep what RECAP_CONFIG says (one configuration for the
        # UI and the CLI); set, they override it for this run.
        "batch_size": Param(None, type=["null", "integer"], minimum=1, maximum=1024, title="Batch size",
                            description="Images per generate() call (empty: caption.batch_size of RECAP_CONFIG)"),
        "filter_profile": Param(CONFIG_PROFILE, enum=[CONFIG_PROFILE, *FILTER_PROFILES], title="Filter profile",
                                description="config: filter.chain of RECAP_CONFIG (default basic); basic: DataComp's "
                                            "basic rules; datacomp: + language, NSFW, faces, dedup, boilerplate"),
        "runner": Param(runner, enum=list(RUNNERS), title="Runner",
                        description="kubernetes: one GPU pod per work unit; dask: a Dask worker with the caption "
                                    "resource (the compose stack); local: a subprocess on the Airflow worker"),
    }


def run_context() -> tuple[dict, str, dict]:
    """(params, recap run id, context) of the running task."""
    from recap_airflow.stages import recap_run_id

    context = get_current_context()
    return context["params"], recap_run_id(context["run_id"]), context


def max_work_units() -> int:
    """How many mapped task instances one stage may have ([core] max_map_length)."""
    from airflow.configuration import conf

    return conf.getint("core", "max_map_length", fallback=1024)


def _download_instances() -> int:
    value = os.environ.get("RECAP_DOWNLOAD_INSTANCES", "").strip() or "4"
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"RECAP_DOWNLOAD_INSTANCES={value!r}: set a whole number of at least 1 (default 4)")
    return int(value)


# How many `download` task instances of one DAG run may fetch at once (max_active_tis_per_dagrun);
# each gets 1/N of the download's per-host connection bound (recap_airflow.stages.instance_connections).
DOWNLOAD_INSTANCES = _download_instances()


def download_task(*, unconfigured: str | None = None):
    """plan_download -> download (mapped: one task instance per unit of shard jobs) -> gather_downloads.

    For source kind `metadata` the images are downloaded into shards (under RECAP_DOWNLOAD_DIR, else
    LAKE/_downloads) and their folders become the source; only unfinished shards make units, so a
    rerun over a finished download, like kind `shards`, passes the source through without any
    `download` instance. Returns the source for `plan`.
    `unconfigured`: a scheduled DAG without a source or model skips with this message.
    """

    @task
    def plan_download() -> list[dict]:
        """The units `download` is mapped over (its return value); the source for `plan` as XCom `source`."""
        from recap_airflow import stages

        params, _, context = run_context()
        if unconfigured and (not params["source"] or not params["model"]):
            # Not configured is not a failure: an unpaused, unconfigured deployment stays green.
            raise AirflowSkipException(unconfigured)
        planned = stages.plan_download(source=params["source"], source_kind=params["source_kind"],
                                       lake=params["lake"], max_units=max_work_units(),
                                       instances=DOWNLOAD_INSTANCES, dry_run=bool(params.get("dry_run")))
        context["ti"].xcom_push(key="source", value=planned["source"])
        return planned["units"]

    # A retried instance resumes: shards with their stats file (one listing per folder) are skipped.
    @task(max_active_tis_per_dagrun=DOWNLOAD_INSTANCES, execution_timeout=timedelta(hours=12))
    def download(unit: dict) -> list[dict]:
        from recap_airflow import stages

        return stages.download_unit(**unit)

    # Runs when `download` has no instance (kind `shards`, a dry run, nothing left to download), not
    # when plan_download skipped.
    @task(trigger_rule="none_failed_min_one_success")
    def gather_downloads(source: str, summaries) -> str:
        from recap_airflow import stages

        stages.gather_downloads(list(summaries or []))
        return source

    units = plan_download()
    return gather_downloads(units["source"], download.expand(unit=units))


def recaption_stages(chunks, *, factory: CaptionRunnerFactory | None = None):
    """ingest -> filter -> caption (pods, Dask or local) -> validate -> publish -> report, one mapped task
    instance per work unit (a chunk of shard paths) in the first three stages."""
    factory = factory or CaptionRunnerFactory()

    @task(max_active_tis_per_dagrun=4)
    def ingest(shards: list[str]) -> dict:
        from recap_airflow import stages

        params, run_id, _ = run_context()
        return stages.ingest(shards=shards, lake=params["lake"], run_id=run_id)

    @task(task_id="filter", max_active_tis_per_dagrun=4)
    def filter_pairs(ingested: dict) -> dict:
        from recap_airflow import stages

        params, run_id, _ = run_context()
        return stages.filter_pairs(lake=params["lake"], run_id=run_id, shard_ids=ingested["shard_ids"],
                                   profile=params["filter_profile"])

    @task
    def caption_units(filtered: list[dict]) -> list[list[str]]:
        """`python -m recap_tasks` arguments for each work unit (one pod or subprocess each)."""
        from recap_airflow.runners import caption_arguments

        params, run_id, _ = run_context()
        return [caption_arguments(lake=params["lake"], model=params["model"], run_id=run_id,
                                  shard_ids=unit["shard_ids"], batch_size=params["batch_size"])
                for unit in filtered if unit["shard_ids"]]

    @task.branch
    def choose_runner() -> str:
        params, _, _ = run_context()
        return {"kubernetes": "caption_pod", "dask": "caption_dask"}.get(params["runner"], "caption_local")

    @task(pool=GPU_POOL, execution_timeout=timedelta(hours=12), retry_delay=timedelta(minutes=2))
    def caption_dask(arguments: list[str]) -> None:
        from recap_airflow.stages import fail_fast

        fail_fast(factory.run_dask)(arguments)

    @task(pool=GPU_POOL, execution_timeout=timedelta(hours=12), retry_delay=timedelta(minutes=2))
    def caption_local(arguments: list[str]) -> None:
        from recap_airflow.stages import fail_fast

        fail_fast(factory.run_local)(arguments)

    # A failed quality gate is a verdict, not a transient error: no retries.
    @task(retries=0, trigger_rule="none_failed")
    def validate() -> dict:
        from recap_airflow import stages

        params, run_id, _ = run_context()
        return stages.validate(lake=params["lake"], run_id=run_id)

    @task(outlets=[PUBLISHED])
    def publish(validated: dict) -> dict:
        from recap_airflow import stages

        params, run_id, context = run_context()
        if validated.get("batch_id") is None:
            # Nothing new was validated, so no batch: nothing to publish (and no asset event).
            raise AirflowSkipException(f"nothing to publish: {validated.get('note') or 'no batch'}")
        summary = stages.publish(lake=params["lake"], run_id=run_id)
        context["outlet_events"][PUBLISHED].extra = {"lake": params["lake"], "run_id": run_id,
                                                     "rows": summary["rows"]}
        return summary

    # none_failed: runs after a publish skipped for want of a batch, and says so.
    @task(retries=1, trigger_rule="none_failed")
    def report(validated: dict) -> dict:
        """The run's quality report; the Airflow UI links each run to it (plugin `recap_reports`)."""
        from recap_airflow import stages

        params, run_id, _ = run_context()
        return stages.report(lake=params["lake"], run_id=run_id, validated=validated)

    ingested = ingest.expand(shards=chunks)
    filtered = filter_pairs.expand(ingested=ingested)
    units = caption_units(filtered)
    branch = choose_runner()
    pods = factory.mapped_pod_operator(task_id="caption_pod", arguments=units)
    on_dask = caption_dask.expand(arguments=units)
    local = caption_local.expand(arguments=units)
    checked = validate()
    branch >> [pods, on_dask, local]
    [pods, on_dask, local] >> checked
    publish(checked) >> report(checked)
    return ingested, checked
