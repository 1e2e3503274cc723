"""Dask distributed: the filter stage's cluster (join a scheduler, or start a LocalCluster sized to
the machine), and recap commands run on a worker of a scheduler (the caption stage's runner=dask)."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import subprocess
import sys
import threading
import uuid
from typing import Iterator

ENV_ADDRESS = "RECAP_DASK_ADDRESS"

log = logging.getLogger(__name__)


def dask_address(configured: str | None = None) -> str | None:
    """The scheduler to join: the configured address (filter.dask_address), else $RECAP_DASK_ADDRESS.

    The one place the address is resolved; None means no scheduler (start a LocalCluster).
    """
    return configured or os.environ.get(ENV_ADDRESS) or None


@contextlib.contextmanager
def dask_client(address: str | None = None, *, workers: int | None = None) -> Iterator[tuple[object, int]]:
    """(client, threads per worker model): a Client of `address` (or $RECAP_DASK_ADDRESS), else of a LocalCluster.

    The LocalCluster has one single-threaded worker process per core (models are not thread-safe
    and each holds its own onnxruntime/torch threads); worker processes start with spawn, which
    deltalake needs (it panics in forked children), and without re-running the host's __main__
    (see _main_hidden_from_spawn), so they start from any host: an Airflow task, a notebook, a script.
    """
    from distributed import Client, LocalCluster

    address = dask_address(address)
    if address:
        log.info("filter: joining Dask scheduler %s", address)
        client = Client(address, timeout="30s")
        try:
            yield client, 1  # a shared cluster's workers are sized by whoever runs it
        finally:
            client.close()
        return
    n = workers or os.cpu_count() or 1
    log.info("filter: starting a LocalCluster of %d worker processes", n)
    # No dashboard; the scheduler still serves HTTP (health, metrics), by default on 8787, so that
    # concurrent tasks warned "Port 8787 is already in use": it takes a free loopback port instead.
    # The spawn guard for the cluster's whole life, not just its start: the nannies (in this
    # process) start a worker process again when one dies or is restarted.
    with _main_hidden_from_spawn(), \
            LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                         silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        yield client, max(1, (os.cpu_count() or 1) // n)


def run_recap_command(arguments: list[str], env: dict[str, str] | None = None, *, cancel: str | None = None,
                      tail: int = 200) -> tuple[int, str]:
    """Run `python -m recap_tasks ARGUMENTS` with this process's interpreter: (exit code, last lines).

    What a Dask worker runs for a submitted command (`submit_recap_command`), so the command runs
    with the worker image's Python and packages; its output goes to the worker's log as it comes.
    `cancel`: the name of a Dask Event; once it is set (the submitter ended: its Airflow task was
    killed or timed out) the command is terminated, rather than left holding the worker's GPU.
    """
    cmd = [sys.executable, "-m", "recap_tasks", *arguments]
    log.info("running: %s", " ".join(cmd))
    lines: collections.deque[str] = collections.deque(maxlen=tail)
    with subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        if cancel:
            from distributed import Event, get_client

            # The worker's client is found from the task's thread only; the Event is used from another.
            event = Event(cancel, client=get_client())
            threading.Thread(target=_terminate_when_set, args=(event, proc), daemon=True).start()
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            log.info("%s", line.rstrip())
    return proc.returncode, "".join(lines)


def _terminate_when_set(event, proc: subprocess.Popen, *, grace: float = 30) -> None:
    """SIGTERM `proc` once the Dask `event` is set (SIGKILL after `grace` seconds); return when it ends."""
    while proc.poll() is None:
        try:
            if not event.wait(timeout=0.5):
                continue
        except Exception:  # the scheduler is gone: nobody can cancel any more
            log.debug("cancel event unreachable", exc_info=True)
            return
        log.warning("the submitter of `%s` ended: terminating the command", " ".join(proc.args[3:5]))
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
        return


def submit_recap_command(arguments: list[str], *, address: str, resource: str, env: dict[str, str] | None = None,
                         timeout: float | None = None) -> tuple[int, str]:
    """Run `python -m recap_tasks ARGUMENTS` on a worker of the Dask scheduler at `address` that
    offers `resource` (`dask worker --resources caption=1`), one unit of it per command; returns
    that worker's (exit code, output tail). If this call ends before the command does (a timeout, or
    the Airflow task killed: an exception raised while waiting), the command is terminated on the worker."""
    from distributed import Client, Event

    from recap_tasks.errors import RecapError

    with Client(address, timeout="30s") as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        if not any(w.get("resources", {}).get(resource) for w in workers):
            raise RecapError(f"no worker of the Dask scheduler {address} offers the resource '{resource}': start "
                             f"workers with `dask worker {address} --resources {resource}=1` (docker-compose.yml's "
                             f"dask-worker)")
        key = f"recap-{arguments[0]}-{uuid.uuid4().hex[:8]}"
        future = client.submit(run_recap_command, arguments, env, cancel=key, resources={resource: 1}, key=key)
        try:
            return future.result(timeout=timeout)
        finally:
            if not future.done():
                with contextlib.suppress(Exception):  # never mask why this call is ending
                    Event(key, client=client).set()
            future.release()


_hidden_lock = threading.Lock()
_hidden_depth = 0
_hidden_saved: tuple[object, dict[str, object]] | None = None


@contextlib.contextmanager
def _main_hidden_from_spawn() -> Iterator[None]:
    """While the block runs, spawn children do not re-run the host's __main__ module.

    A spawn child first re-runs the parent's main module as __mp_main__: by name when __main__
    has a __spec__ (`python -m pkg.mod`), by path when it has a __file__ (a script, a console
    script such as `airflow`). Under Airflow that is the `airflow` script, whose import sets
    Airflow up from an environment where the task runner has replaced the metadata DB URL with
    `airflow-db-not-allowed:///`, so every Dask worker died at start ("Nanny failed to start
    worker process"); a script would run its unguarded top-level code again in every worker.
    Workers need nothing from __main__: they import recap_tasks, and distributed pickles any
    __main__ function by value (cloudpickle).

    multiprocessing never re-runs a main module whose spec is named "__main__" (a directory or
    zip archive run by path: its code is all "main only"), so __main__.__spec__ is set to such a
    spec; __file__ and everything else in __main__ stay as they are. (A REPL, `python -c` and a
    Jupyter kernel have neither attribute and were never affected.)

    Alternatives weighed (distributed 2026.8): `distributed.worker.multiprocessing-method` only
    picks spawn/forkserver/fork: forkserver children re-run __main__ the same way, and fork
    breaks deltalake and forks a threaded task process. Workers as `python -m dask spec`
    subprocesses (SubprocessCluster/SubprocessWorker, experimental) never see the host's
    __main__ but start about twice as slowly with a nanny, do not inherit this process's
    sys.path or Dask config, and bind to the public interface unless told otherwise.

    __spec__ is process-wide: it stays replaced until the last overlapping block exits
    (reference-counted, thread-safe), then the module that had it gets it back.
    """
    global _hidden_depth, _hidden_saved
    from importlib.machinery import ModuleSpec

    with _hidden_lock:
        if _hidden_depth == 0:
            main = sys.modules.get("__main__")
            if main is not None:
                _hidden_saved = (main, {k: main.__dict__[k] for k in ("__spec__",) if k in main.__dict__})
                main.__spec__ = ModuleSpec("__main__", None, origin=getattr(main, "__file__", None))
        _hidden_depth += 1
    try:
        yield
    finally:
        with _hidden_lock:
            _hidden_depth -= 1
            if _hidden_depth == 0 and _hidden_saved is not None:
                main, saved = _hidden_saved
                _hidden_saved = None
                main.__dict__.pop("__spec__", None)
                main.__dict__.update(saved)
