"""Fault injection for crash tests: `RECAP_FAULT=<stage>:<point>` kills the process with SIGKILL.

Set for one `recap <stage>` command (tests/test_resume.py), it stops that stage at a precise place,
as a power cut or an OOM kill would:

- `<stage>:commit` or `<stage>:commit:<n>`: right after the stage's n-th data commit (default the
  first): any Delta commit to a lake table other than `progress`;
- `<stage>:record`: right before the stage's first record of what it did (a `progress` record, or
  validate's batch record), i.e. between its data commits and their record.

Armed only by the CLI for the verb that is running (`arm(args.command)`); unset, every hook is a
no-op that reads nothing. Never set it in production.
"""

from __future__ import annotations

import os
import signal

_target: tuple[str, int] | None = None  # (point, n) armed for this process
_seen = {"commit": 0, "record": 0}


def arm(stage: str) -> None:
    """Arm RECAP_FAULT in this process if it names `stage`."""
    global _target
    _seen.update(commit=0, record=0)
    spec = os.environ.get("RECAP_FAULT", "")
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != stage:
        _target = None
        return
    if parts[1] not in _seen or len(parts) > 3:
        raise ValueError(f"RECAP_FAULT={spec!r}: expected <stage>:commit[:<n>] or <stage>:record")
    _target = (parts[1], int(parts[2]) if len(parts) > 2 else 1)


def reached(point: str) -> None:
    """Called at each commit point ("commit" after, "record" before); kills the process on the armed one."""
    if _target is None or _target[0] != point:
        return
    _seen[point] += 1
    if _seen[point] == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
