"""The filter chain on a real Dask LocalCluster of 2 workers: models load once per worker, a broken
shard is reported by id and the other shards' results are written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from recap_tasks import lake as tables
from recap_tasks.config import FilterConfig
from recap_tasks.stages.filter import ShardsFailed, funnel, model_loads, run_filter
from tests.filters.util import by_key, make_lake, photo

NAMES = ("astronaut", "coffee", "chelsea", "rocket")

# A host whose main module must not be imported twice, as under Airflow: the task runner's main
# module is the `airflow` script, and importing it in a child reads the blocked metadata DB URL.
POISONED_HOST = """
import multiprocessing, os, sys
if __name__ != "__main__":
    raise RuntimeError(f"host main module re-imported as {__name__!r}")
import json

def plus_one(x):  # lives in __main__: distributed ships it by value
    return os.getpid(), x + 1

# The control: a plain spawn child re-imports this file and dies, as the Dask workers did.
control = multiprocessing.get_context("spawn").Process(target=os.getpid)
control.start()
control.join()
spec = __spec__

# Another cluster's HTTP server holds Dask's default port: the task's scheduler takes a free one
# without the "Port 8787 is already in use" warning (issue 23).
import socket
blocker = socket.socket()
try:
    blocker.bind(("", 8787))
    blocker.listen()
except OSError:
    pass  # already held by something else: just as good

from recap_tasks.distributed import dask_client

with dask_client(workers=2) as (client, threads):
    before = client.run(os.getpid)
    pid, two = client.submit(plus_one, 1).result()
    client.restart()  # the nannies start fresh worker processes
    after = client.run(os.getpid)
    file_in_block = __file__
print(json.dumps({"control_exit": control.exitcode, "workers": len(before), "task": [pid in before.values(), two],
                  "restarted": len(after), "new_pids": not set(after.values()) & set(before.values()),
                  "host": os.getpid() not in before.values(), "file": file_in_block == sys.argv[0],
                  "spec_restored": sys.modules["__main__"].__spec__ is spec}))
"""


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            Client(c) as client:
        yield c, client


def test_local_cluster_workers_start_without_the_hosts_main_module(tmp_path):
    """Issue 14: from an Airflow task every worker died ("Nanny failed to start worker process")."""
    host = tmp_path / "host.py"
    host.write_text(textwrap.dedent(POISONED_HOST))
    proc = subprocess.run([sys.executable, str(host)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["control_exit"] != 0 and "re-imported as '__mp_main__'" in proc.stderr  # the host is poisoned
    assert "already in use" not in proc.stderr, proc.stderr[-3000:]
    assert out == {"control_exit": out["control_exit"], "workers": 2, "task": [True, 2], "restarted": 2,
                   "new_pids": True, "host": True, "file": True, "spec_restored": True}


def test_chain_on_two_workers(tmp_path, cluster, monkeypatch):
    local, client = cluster
    shards = {f"0000{s}.tar": [(f"0000{s}000{i}", f"photo number {i} of shard {s}: a {n} seen up close", photo(n, (320 + 8 * s, 300)))
                               for i, n in enumerate(NAMES[s % 2::2])] for s in range(4)}
    lake = make_lake(tmp_path, shards)
    (tmp_path / "src" / "00003.tar").unlink()  # its source vanished after ingest
    config = FilterConfig(chain="datacomp", dask_address=local.scheduler_address, batch_size=2)
    with pytest.raises(ShardsFailed, match=r"src/00003.tar \(FileNotFoundError") as failed:
        run_filter(lake, config=config)
    result = failed.value.result
    assert result.failed_shards.keys() == {"src/00003.tar"}
    v = by_key(lake, tables.FILTER_RESULTS)
    # Shards 0-2 judged: shard 2 repeats shard 0's photos slightly larger, so those win as near
    # duplicates; shard 3 stays pending for a rerun.
    assert {k[:5] for k in v} == {"00000", "00001", "00002"} and len(v) == 6
    assert {k for k, r in v.items() if r["reason"] == "near_duplicate_image"} == {"000000000", "000000001"}
    assert all(r["faces"] is not None and r["nsfw_score"] is not None for r in v.values() if r["kept"])
    assert v["000010000"]["faces"] == 0 and v["000020000"]["faces"] == 1  # coffee; astronaut

    loads = client.run(model_loads)
    assert sorted(loads) == sorted(local.scheduler_info["workers"])
    assert all(n.get("datacomp", 0) <= 1 for n in loads.values())  # once per worker, 4 tasks
    assert sum(n.get("datacomp", 0) for n in loads.values()) >= 1

    # The same cluster through the environment; the restored shard is the only work left.
    shards_again = make_lake(tmp_path, {"00003.tar": shards["00003.tar"]})
    assert shards_again.uri == lake.uri
    monkeypatch.setenv("RECAP_DASK_ADDRESS", local.scheduler_address)
    again = run_filter(lake, config=FilterConfig(chain="datacomp", batch_size=2))
    assert again.rows_in == 2 and not again.failed_shards
    assert all(n.get("datacomp", 0) <= 1 for n in client.run(model_loads).values())
    runs = funnel(lake)
    assert [r["rows_in"] for r in runs.values()] == [6, 2]
    first = next(iter(runs.values()))
    assert first["rows_out"] == 6 - sum(first["dropped"].values())


def test_a_model_that_fails_to_load_on_a_worker_stops_the_run(tmp_path, cluster):
    from recap_tasks.filters import ModelLoadError

    local, _ = cluster
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx model")
    lake = make_lake(tmp_path, {"00000.tar": [("000000001", "a cup of coffee on a saucer", photo("coffee"))],
                                "00001.tar": [("000010001", "a cat lying on a red chair", photo("chelsea"))]})
    with pytest.raises(ModelLoadError, match=rf"filter 'nsfw': cannot load model {bad}"):
        run_filter(lake, config=FilterConfig(chain="datacomp", dask_address=local.scheduler_address,
                                             nsfw_model=str(bad)))
    assert lake.read(tables.FILTER_RESULTS).num_rows == 0
