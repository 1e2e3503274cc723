"""Where a GPU stage runs: the same `python -m recap_tasks caption ...` argv, in a Kubernetes pod
built by the pod factory (`runner=kubernetes`), on a Dask worker that offers the `caption` resource
(`runner=dask`: the compose stack's workers run the worker image, as pods do), or as a subprocess of
the Airflow worker (`runner=local`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Literal

log = logging.getLogger(__name__)

Runner = Literal["kubernetes", "dask", "local"]
RUNNERS: tuple[Runner, ...] = ("kubernetes", "dask", "local")
ENTRYPOINT = ["python", "-m", "recap_tasks"]  # the worker image's entry point (docker/worker.Dockerfile)
USER_ERROR = 2  # recap's exit code for RecapError (recap_tasks.errors)
# The Dask worker resource a caption command takes one unit of (`dask worker --resources caption=1`).
DASK_RESOURCE = os.environ.get("RECAP_DASK_CAPTION_RESOURCE", "caption")


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
    raise_for_exit(rc, lines, what=" ".join(cmd[1:4]))
    return "".join(lines)


def run_dask(arguments: list[str], *, env: dict[str, str] | None = None, address: str | None = None,
             resource: str = DASK_RESOURCE, timeout: float | None = None) -> str:
    """Run `python -m recap_tasks ARGUMENTS` on a worker of the Dask scheduler (`address`, else
    RECAP_DASK_ADDRESS) that offers `resource`, and log its output tail into the task log."""
    from recap_tasks.distributed import ENV_ADDRESS, dask_address, submit_recap_command
    from recap_tasks.errors import RecapError

    scheduler = dask_address(address)
    if not scheduler:
        raise RecapError(f"runner=dask needs a Dask scheduler: set {ENV_ADDRESS} (docker-compose.yml sets "
                         f"tcp://dask-scheduler:8786), or choose another runner")
    log.info("running on a Dask worker of %s with resource %s: python -m recap_tasks %s", scheduler, resource,
             " ".join(arguments))
    rc, output = submit_recap_command(arguments, address=scheduler, resource=resource, env=env, timeout=timeout)
    lines = output.splitlines(keepends=True)
    for line in lines:
        log.info("%s", line.rstrip())
    raise_for_exit(rc, lines, what=f"recap_tasks {arguments[0]} on a Dask worker")
    return output


def raise_for_exit(rc: int, lines: list[str], *, what: str) -> None:
    """A command's exit code as an exception: RecapError with the last line for exit 2 (recap's
    one-line user error: not worth a retry), RuntimeError with the output tail for any other failure."""
    if rc == USER_ERROR:
        from recap_tasks.errors import RecapError

        raise RecapError(lines[-1].strip() if lines else f"{what} exited with {rc}")
    if rc != 0:
        raise RuntimeError(f"{what} exited with {rc}: {''.join(lines[-20:])}")
