"""Where a GPU stage runs: the same `python -m recap_tasks caption ...` argv, either as a local
subprocess (`runner=local`) or in a Kubernetes pod built by the pod factory (`runner=kubernetes`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Literal

log = logging.getLogger(__name__)

Runner = Literal["kubernetes", "local"]
RUNNERS: tuple[Runner, ...] = ("kubernetes", "local")
ENTRYPOINT = ["python", "-m", "recap_tasks"]
USER_ERROR = 2  # recap's exit code for RecapError (recap_tasks.errors)  # the worker image's entry point (docker/worker.Dockerfile)


def caption_arguments(*, lake: str, model: str, run_id: str, shard_ids: list[str] | None = None,
                      batch_size: int | None = None) -> list[str]:
    """The arguments after `python -m recap_tasks` for one caption work unit, wherever it runs."""
    args = ["caption", "--lake", lake, "--model", model, "--run-id", run_id]
    for shard_id in shard_ids or ():
        args += ["--shard", shard_id]
    if batch_size:
        args += ["--batch-size", str(batch_size)]
    return args


def local_command(arguments: list[str], *, python: str | None = None) -> list[str]:
    """The pod's command with this interpreter as `python` (the venv Airflow runs in)."""
    return [python or sys.executable, *ENTRYPOINT[1:], *arguments]


def run_local(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    """Run a recap_tasks command as a subprocess, streaming its output into the task log."""
    full_env = {**os.environ, **(env or {})}
    log.info("running: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        log.info("%s", line.rstrip())
    rc = proc.wait(timeout=timeout)
    if rc == USER_ERROR:
        # `recap` exits 2 on a user error (its one-line message is the last line): not worth a retry.
        from recap_tasks.errors import RecapError

        raise RecapError(lines[-1].strip() if lines else f"{' '.join(cmd[1:4])} exited with {rc}")
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])} exited with {rc}: {''.join(lines[-20:])}")
    return "".join(lines)
