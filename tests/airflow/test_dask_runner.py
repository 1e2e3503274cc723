"""runner=dask: the command a caption pod runs, submitted to a real Dask worker that offers the
`caption` resource (as docker-compose.yml's dask-worker), run there by the real CLI on the sample
shards with the tiny model."""

import subprocess
import sys
from pathlib import Path

import pytest

from recap_airflow.pods import CaptionRunnerFactory, PodSettings
from recap_airflow.runners import caption_arguments, local_command, run_dask, run_local
from recap_tasks import lake as tables
from recap_tasks.distributed import _main_hidden_from_spawn
from recap_tasks.errors import RecapError
from recap_tasks.lake import Lake
from recap_tasks.stages.filter import run_filter
from recap_tasks.stages.ingest import ingest


@pytest.fixture(scope="module")
def caption_scheduler(tmp_path_factory):
    """The address of a Dask scheduler with two single-threaded workers started by the `dask` CLI,
    as in docker-compose.yml: `caption` offers caption=1, `plain` (where filter tasks may run) none."""
    from distributed import Client

    scheduler_file = tmp_path_factory.mktemp("dask") / "scheduler.json"
    dask = [str(Path(sys.executable).parent / "dask")]
    common = ["--scheduler-file", str(scheduler_file), "--no-dashboard"]
    procs = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", *common])]
    try:
        for name, extra in (("caption", ["--resources", "caption=1"]), ("plain", [])):
            procs.append(subprocess.Popen([*dask, "worker", "--name", name, "--nthreads", "1", "--host", "127.0.0.1",
                                           *common, *extra]))
        with Client(scheduler_file=str(scheduler_file), timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            yield client.scheduler.address
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(60)


def _workers_that_ran(address: str, prefix: str) -> dict[str, bool]:
    """Worker name -> whether a task whose key starts with `prefix` ran there (the workers' task logs)."""
    from distributed import Client

    def ran(dask_worker):
        return dask_worker.name, any(str(entry[0]).startswith(prefix) for entry in dask_worker.state.log)

    with Client(address) as client:
        return dict(client.run(ran).values())


def test_caption_command_runs_on_the_worker_with_the_caption_resource(caption_scheduler, monkeypatch, tmp_path,
                                                                      sample_shards, tiny_model):
    lake = Lake(tmp_path / "lake")
    ingest([f"{sample_shards}/*.tar"], lake, run_id="dask1")
    kept = run_filter(lake, run_id="dask1").kept
    assert kept > 0
    monkeypatch.setenv("RECAP_DASK_ADDRESS", caption_scheduler)

    output = CaptionRunnerFactory(PodSettings()).run_dask(
        caption_arguments(lake=lake.uri, model=str(tiny_model), run_id="dask1", batch_size=4))

    captions = lake.read(tables.CAPTIONS, ["uid", "run_id", "model"]).to_pylist()
    assert len({c["uid"] for c in captions}) == kept
    assert {(c["run_id"], c["model"]) for c in captions} == {("dask1", str(tiny_model))}
    assert f'"captioned": {kept}' in output  # the CLI's summary, handed back from the worker
    assert _workers_that_ran(caption_scheduler, "recap-caption-") == {"caption": True, "plain": False}


def test_user_error_on_the_worker_is_one_line_as_with_the_local_runner(caption_scheduler, tmp_path, tiny_model):
    arguments = caption_arguments(lake=str(tmp_path / "no-lake"), model=str(tiny_model), run_id="x")
    with pytest.raises(RecapError) as on_dask:
        run_dask(arguments, address=caption_scheduler)
    with pytest.raises(RecapError) as local:
        run_local(local_command(arguments))
    message = str(on_dask.value)
    assert message == str(local.value) and "\n" not in message and "no-lake" in message


def test_every_command_lands_on_a_worker_with_the_resource(caption_scheduler):
    # Unrestricted tasks go round-robin over idle workers: four of them would reach `plain`.
    for _ in range(4):
        assert "--shard" in run_dask(["caption", "--help"], address=caption_scheduler)
    assert _workers_that_ran(caption_scheduler, "recap-caption-") == {"caption": True, "plain": False}


def test_refuses_a_scheduler_without_the_resource_or_none(caption_scheduler, monkeypatch, tmp_path):
    arguments = caption_arguments(lake=str(tmp_path), model="m", run_id="x")
    with pytest.raises(RecapError, match="offers the resource 'gpu'.*--resources gpu=1"):
        run_dask(arguments, address=caption_scheduler, resource="gpu")
    monkeypatch.delenv("RECAP_DASK_ADDRESS", raising=False)
    with pytest.raises(RecapError, match="RECAP_DASK_ADDRESS"):
        run_dask(arguments)


def _command_lines() -> list[str]:
    """Every process's command line on this machine (the test's Dask workers run here)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:  # ended meanwhile
                pass
    return found


def test_a_killed_task_stops_its_command_on_the_worker(caption_scheduler, tmp_path, sample_shards, tiny_model):
    """An Airflow task killed while it waits (its execution timeout is SIGALRM raising in the task)
    terminates its command on the worker too: nothing captioned, no process left holding the GPU."""
    import os
    import signal
    import threading
    import time
    import uuid

    lake = Lake(tmp_path / "lake")
    ingest([f"{sample_shards}/*.tar"], lake, run_id="kill")
    assert run_filter(lake, run_id="kill").kept > 0
    run_id = f"kill-{uuid.uuid4().hex[:8]}"  # also marks the command's process
    arguments = caption_arguments(lake=lake.uri, model=str(tiny_model), run_id=run_id, batch_size=4)

    def running() -> bool:
        return any(run_id in line for line in _command_lines())

    def kill_once_running() -> None:
        deadline = time.monotonic() + 120
        while not running() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGALRM)

    class Killed(Exception):
        pass

    def on_alarm(signum, frame):
        raise Killed

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        threading.Thread(target=kill_once_running, daemon=True).start()
        with pytest.raises(Killed):
            run_dask(arguments, address=caption_scheduler)
    finally:
        signal.signal(signal.SIGALRM, previous)
    deadline = time.monotonic() + 60
    while running():
        assert time.monotonic() < deadline, "the caption command still runs on the worker a minute later"
        time.sleep(0.2)
    captions = lake.read(tables.CAPTIONS, ["run_id"]).column("run_id").to_pylist()
    assert run_id not in captions, "the command ran to the end: it was not terminated"
