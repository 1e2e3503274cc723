"""How a GPU stage runs: the same `python -m recap_tasks ...` command, as a local subprocess here
and (later) as a Kubernetes pod built by the pod factory."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Literal

log = logging.getLogger(__name__)

Runner = Literal["local"]


def caption_command(*, lake: str, model: str, run_id: str, batch_size: int | None = None,
                    python: str | None = None) -> list[str]:
    """The exact argv a caption worker runs, wherever it runs."""
    cmd = [python or sys.executable, "-m", "recap_tasks", "caption", "--lake", lake, "--model", model,
           "--run-id", run_id]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    return cmd


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
    if rc != 0:
        raise RuntimeError(f"{cmd[2:4]} exited with {rc}: {''.join(lines[-20:])}")
    return "".join(lines)
