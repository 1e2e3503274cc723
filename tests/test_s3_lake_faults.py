"""The lake on S3 under concurrency and faults (issue 29): concurrent `recap run`s on one s3:// lake
(moto) behind a proxy that answers 503 and 500 and cuts connections mid-response, and `recap run`s
killed with SIGKILL part way. Each command either succeeds or fails with one line; rerun, the lake
holds every row once: 0 duplicates, nothing lost, `recap status --verify` exit 0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recap_tasks.lake import Lake
from tests.helpers import REPO
from tests.s3 import FaultyS3, s3_env, s3_environment, s3_server  # noqa: F401  (fixtures: the S3 emulator)

PUBLISHED = 18  # the sample shards' pairs that pass every stage (tests/test_object_storage.py)


def _recap(args: list[str], endpoint: str, **env) -> subprocess.Popen:
    full = {**os.environ, "RECAP_QUIET": "1", **s3_environment(endpoint), **env}
    return subprocess.Popen([sys.executable, "-m", "recap_tasks", *args], cwd=REPO, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _one_line_or_success(code: int, err: str, verb: str = "run") -> None:
    """A command under store faults either succeeds or fails with one line naming what failed."""
    assert "Traceback" not in err, err[-3000:]
    if code != 0:
        last = [line for line in err.splitlines() if line.strip()][-1]
        assert last.startswith(f"recap {verb}: error: "), err[-3000:]


def _settled(lake: str, sources: list[str], model: str, endpoint: str, tries: int = 4) -> None:
    """Rerun until a run succeeds (a run that meets a fault past every retry stops with one line)."""
    for _ in range(tries):
        code, err = _finish(_recap(["run", *sources, "--lake", lake, "--model", model], endpoint))
        _one_line_or_success(code, err)
        if code == 0:
            return
    pytest.fail(f"recap run did not succeed in {tries} tries: {err[-2000:]}")


def _assert_exact(lake_uri: str, endpoint: str) -> None:
    code, err = _finish(_recap(["status", "--verify", "--lake", lake_uri], endpoint))
    assert code == 0, err[-3000:]
    uids = Lake(lake_uri).read("recap", ["uid"]).column("uid").to_pylist()
    assert len(uids) == len(set(uids)) == PUBLISHED  # none twice, none lost


def test_concurrent_runs_on_an_s3_lake_under_store_faults(s3_env, s3_server, sample_shards, tiny_model):
    s3, bucket = s3_env
    lake = f"s3://{bucket}/lake"
    proxy = FaultyS3(s3_server, rate=0.04, seed=29)
    try:
        runs = [_recap(["run", str(sample_shards), "--lake", lake, "--model", str(tiny_model), "--run-id", f"r{i}"],
                       proxy.url) for i in range(3)]
        for proc in runs:
            _one_line_or_success(*_finish(proc))
        injected = dict(proxy.injected)
        # The store recovers; a run through the same proxy then finishes what the faulted ones left.
        proxy.rate = 0
        _settled(lake, [str(sample_shards)], str(tiny_model), proxy.url)
        # Every Delta commit is a conditional PUT: `If-None-Match: *` on the next version's log file.
        commits = [r for r in proxy.requests if r[0] == "PUT" and "/_delta_log/" in r[1] and r[1].endswith(".json")]
        assert commits and all(r[2] == "*" for r in commits), commits[:5]
    finally:
        proxy.close()
    assert all(injected.get(kind, 0) > 0 for kind in ("503", "500", "cut")), injected
    _assert_exact(lake, s3_server)


@pytest.mark.parametrize("commit", [2, 4, 6])
def test_a_run_killed_mid_way_on_an_s3_lake_resumes_exactly(s3_env, s3_server, sample_shards, tiny_model, commit):
    """SIGKILL right after the run's n-th data commit (ingest, filter, caption), then the same run."""
    s3, bucket = s3_env
    lake = f"s3://{bucket}/lake"
    args = ["run", str(sample_shards), "--lake", lake, "--model", str(tiny_model)]
    code, err = _finish(_recap(args, s3_server, RECAP_FAULT=f"run:commit:{commit}"))
    assert code == -9, (code, err[-2000:])  # killed where asked, not finished
    _settled(lake, [str(sample_shards)], str(tiny_model), s3_server, tries=1)
    _assert_exact(lake, s3_server)
