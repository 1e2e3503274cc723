"""kill -9 at every stage, then the same command again: the lake equals a clean run's.

Each case starts from the clean run's lake as it was before the stage, runs `recap <stage>` in a
child process that recap_tasks/faults.py kills with SIGKILL at a precise place (RECAP_FAULT):

- `commit`: right after the stage's first data commit (`commit:2`: after the second);
- `record`: between the stage's data commits and its first progress record (validate: its batch
  record),

then reruns the same command and the rest of the pipeline (in this process: same CLI entry point,
no interpreter start per command), and compares every table of the lake with the clean run's, row
by row, and runs `recap status --verify`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from recap_tasks import progress, schemas
from recap_tasks.batches import Batch, all_batches
from recap_tasks.cli import main
from recap_tasks.hygiene import word_count
from recap_tasks.lake import Lake
from tests.helpers import REPO

STAGES = ("ingest", "filter", "caption", "validate", "publish")

# Columns that differ between two correct runs of the same inputs, left out of the comparison:
# which run wrote a row (run ids; a quarantine row's batch_id is its validating run's id) and when
# (timestamps). Every other column, scores and verdicts and captions included, must be equal.
# A validate killed after its quarantine commit leaves rows whose batch_id names a batch never
# recorded: the rerun adopts them (re-labels them with its own batch id and counts them), so its
# batch record counts what a clean run's does; the test checks both.
RUN_COLUMNS = {"run_id", "caption_run_id", "publish_run_id", "batch_id",
               "ingested_at", "rejected_at", "filtered_at", "captioned_at", "published_at", "quarantined_at",
               "recorded_at"}

# Small parts (a caption kill lands inside a shard) and a shorter generation (faster).
CONFIG = """\
filter:
  executor: local
caption:
  batch_size: 8
  commit_every: 8
  max_new_tokens: 12
validate:
  require_english: false
"""


def _argv(stage: str, lake: Path, run: dict, run_id: str) -> list[str]:
    extra = {"ingest": [str(run["shards"])], "caption": ["--model", str(run["model"])]}.get(stage, [])
    return [stage, *extra, "--lake", str(lake), "--config", str(run["config"]), "--run-id", run_id]


def _stage(stage: str, lake: Path, run: dict, run_id: str) -> None:
    assert main(_argv(stage, lake, run, run_id)) == 0, f"recap {stage} failed on {lake}"


@pytest.fixture(scope="module")
def clean(tmp_path_factory, sample_shards, tiny_model) -> dict:
    """One clean run, stage by stage through the CLI, with a copy of the lake before each stage."""
    root = tmp_path_factory.mktemp("resume")
    run = {"shards": sample_shards, "model": tiny_model, "config": root / "config.yaml", "lake": root / "clean",
           "before": {}}
    run["config"].write_text(CONFIG)
    for stage in STAGES:
        if stage == "validate":
            # Quarantine the rarer of the shortest or the longest recaptions, so validate has a data
            # commit (its quarantine rows) before its batch record: the tiny model's lengths are
            # known only now.
            lengths = [word_count(t) for t in Lake(run["lake"]).read("captions", ["re_caption"])
                       .column("re_caption").to_pylist()]
            low, high = min(lengths), max(lengths)
            bound = f"min_caption_words: {low + 1}" if lengths.count(low) <= lengths.count(high) else \
                f"max_caption_words: {high - 1}"
            run["config"].write_text(CONFIG + f"  {bound}\n  max_quarantine_fraction: 0.5\n")
        before = run["before"][stage] = root / f"before-{stage}"
        if run["lake"].exists():
            shutil.copytree(run["lake"], before)
        _stage(stage, run["lake"], run, f"clean-{stage}")
    lake = Lake(run["lake"])
    quarantined, published = lake.read("quarantine").num_rows, lake.read("recap").num_rows
    assert quarantined > 0 and published > 0, (quarantined, published)
    run["tables"] = _content(lake)
    return run


def _content(lake: Lake) -> dict[str, list[str]]:
    """Every table's rows, less RUN_COLUMNS, each row as sorted-key JSON, sorted; `progress` as its
    latest record per (shard, stage), which is what every reader of it uses (a rerun appends
    records)."""
    out = {}
    for table in schemas.TABLES:
        data = progress.latest(lake) if table == "progress" else lake.read(table)
        data = data.drop_columns([c for c in data.column_names if c in RUN_COLUMNS])
        out[table] = sorted(json.dumps(r, sort_keys=True, default=str) for r in data.to_pylist())
    return out


def _diff(clean: dict[str, list[str]], resumed: dict[str, list[str]]) -> list[str]:
    problems = []
    for table, rows in clean.items():
        other = resumed[table]
        if rows != other:
            missing = [r for r in rows if r not in other][:3]
            extra = [r for r in other if r not in rows][:3]
            problems.append(f"{table}: clean {len(rows)} rows, resumed {len(other)}; only in clean: {missing}; "
                            f"only in resumed: {extra}")
    return problems


CASES = [(stage, point) for stage in STAGES for point in ("commit", "record")] + [
    # Between filter_results and the dedup index: verdicts committed, the kept rows not indexed yet.
    ("filter", "commit:2"),
]


@pytest.mark.parametrize("stage, point", CASES, ids=[f"{s}-{p.replace(':', '')}" for s, p in CASES])
def test_kill_9_then_rerun_equals_a_clean_run(clean, tmp_path, stage, point):
    lake = tmp_path / "lake"
    if clean["before"][stage].exists():
        shutil.copytree(clean["before"][stage], lake)
    cmd = [sys.executable, "-m", "recap_tasks", *_argv(stage, lake, clean, "killed")]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "RECAP_FAULT": f"{stage}:{point}"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, \
        f"recap {stage} was not killed at {point} (exit {proc.returncode}): {proc.stderr[-2000:]}"
    for later in STAGES[STAGES.index(stage):]:
        _stage(later, lake, clean, "resumed")
    assert _diff(clean["tables"], _content(Lake(lake))) == []
    assert main(["status", "--verify", "--lake", str(lake)]) == 0
    resumed = Lake(lake)
    # Every quarantine row names a recorded batch, and the batch that validated the rows counts what
    # the clean run's did (after `validate-commit` it adopted the killed run's quarantine rows).
    assert set(resumed.read("quarantine", ["batch_id"]).column("batch_id").to_pylist()) <= \
        {b.batch_id for b in all_batches(resumed)}
    validated = Batch.load(resumed, "resumed" if STAGES.index(stage) <= STAGES.index("validate") else "clean-validate")
    expected = Batch.load(Lake(clean["lake"]), "clean-validate")
    assert (validated.rows, validated.quarantined) == (expected.rows, expected.quarantined)


def test_the_fault_hook_is_inert_unless_armed_for_the_running_stage(monkeypatch):
    from recap_tasks import faults

    monkeypatch.setenv("RECAP_FAULT", "publish:commit")
    faults.arm("ingest")  # another stage: nothing armed
    faults.reached("commit")
    monkeypatch.setenv("RECAP_FAULT", "publish:flush")
    with pytest.raises(ValueError, match="RECAP_FAULT"):
        faults.arm("publish")
    monkeypatch.delenv("RECAP_FAULT")
    faults.arm("publish")
    faults.reached("commit")
    faults.reached("record")


# Validation runs the same check on its batch's shards before writing the batch -------------------

def test_a_clean_lake_validates_with_its_accounting_checked(clean):
    batch = Batch.load(Lake(clean["lake"]), "clean-validate")
    assert batch.success and batch.quarantined > 0
    check = batch.results[-1]
    assert check["expectation"] == "row_count_reconciliation" and check["success"]
    assert check["observed"]["problems"] == [] and check["observed"]["passed_ingest"] == 21


def test_validate_refuses_a_batch_whose_shard_lost_a_pair_row(clean, tmp_path, capsys):
    """A pair row deleted behind Recap's back (its caption is still there: the batch would silently
    drop it) refuses the batch, naming the shard and the kind of loss in one line; nothing is
    quarantined or published."""
    shutil.copytree(clean["before"]["validate"], tmp_path / "lake")
    lake = Lake(tmp_path / "lake")
    row = lake.read("captions", ["uid", "shard_id"]).slice(0, 1).to_pylist()[0]
    DeltaTable(lake.path("pairs")).delete(f"uid = '{row['uid']}'")
    capsys.readouterr()
    assert main(_argv("validate", lake.root, clean, "broken")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recap validate: error: batch broken")
    assert f"row_count_reconciliation: lost in pairs, shard {row['shard_id']}: pairs holds" in err[0], err[0]
    batch = Batch.load(lake, "broken")
    assert not batch.success and batch.failed == ["row_count_reconciliation"]
    assert lake.read("quarantine").num_rows == 0 and lake.read("recap").num_rows == 0
    assert main(["publish", "--lake", str(lake.root), "--batch", "broken"]) == 1
