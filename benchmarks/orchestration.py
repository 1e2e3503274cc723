"""Orchestration overhead: the same shards through Airflow (the UI path) and through `recap run`.

Usage: python benchmarks/orchestration.py [--data ../shared/data] [--parallelism 2] [--dask-cluster]

--dask-cluster: the filter tasks join one long-lived local Dask cluster (a `dask scheduler` and
`dask worker`s, one single-threaded worker per core, RECAP_DASK_ADDRESS), as `./dev standalone`
starts beside `airflow standalone`, instead of starting a LocalCluster each.

Needs PostgreSQL on 127.0.0.1:5432 (as the Airflow tests). Starts a real api-server, scheduler and
dag-processor (LocalExecutor, `[core] parallelism` as given) on a throwaway database, triggers
`recap_pipeline` with the three coco-mini-wds shards (runner=local, the form's defaults), and
measures the run from trigger to success; then `recap run` on the same shards into a fresh lake
with the same config (basic chain, filter on a Dask LocalCluster, tiny random LLaVA). Prints both
wall times, their ratio, and per task the seconds it ran, so the extra time can be attributed:
per-task process start and imports, a Dask cluster and model load per mapped unit, scheduling gaps.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RECAP_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _machine import describe  # noqa: E402


def _ts(value: str | None) -> float | None:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


class _DaskCluster:
    """A `dask scheduler` and `dask worker`s on 127.0.0.1 as ./dev standalone starts them; yields the address."""

    def __init__(self, scheduler_file: Path):
        self.file = scheduler_file
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> str:
        import json

        dask = str(Path(sys.executable).parent / "dask")
        self.procs.append(subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                            "--scheduler-file", str(self.file)], stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while not (self.file.exists() and self.file.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.procs.append(subprocess.Popen([dask, "worker", "--scheduler-file", str(self.file), "--nworkers",
                                            str(os.cpu_count() or 1), "--nthreads", "1", "--host", "127.0.0.1",
                                            "--no-dashboard"], stderr=subprocess.DEVNULL))
        return json.loads(self.file.read_text())["address"]

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--dask-cluster", action="store_true",
                        help="filter tasks join one long-lived local Dask cluster (as ./dev standalone)")
    args = parser.parse_args()
    source = args.data / "coco-mini-wds"
    if not source.is_dir():
        sys.exit(f"orchestration.py: no {source}; pass --data DIR")
    from recap_tasks.captioning.tiny_model import make_test_model
    from tests.airflow.services import AirflowServices, postgres_available

    reason = postgres_available()
    if reason:
        sys.exit(f"orchestration.py: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_test_model(work / "tiny-llava")
        config = work / "config.yaml"
        config.write_text("validate:\n  require_english: false\n")
        print(f"machine: {describe()}")
        print(f"shards: 3 (coco-mini-wds, 239 pairs); Airflow parallelism {args.parallelism}")

        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "recap_tasks", "run", str(source), "--lake", str(work / "cli"),
                               "--model", str(model), "--config", str(config)],
                              capture_output=True, text=True, env={**os.environ, "RECAP_CONFIG": str(config)})
        cli = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(proc.stderr[-2000:])

        lake = work / "airflow-lake"
        env = {"RECAP_LAKE": str(lake), "RECAP_MODEL": str(model), "RECAP_RUNNER": "local",
               "RECAP_CONFIG": str(config), "RECAP_INCREMENTAL_SCHEDULE": "none",
               "AIRFLOW__CORE__PARALLELISM": str(args.parallelism)}
        dask = _DaskCluster(work / "dask-scheduler.json") if args.dask_cluster else contextlib.nullcontext()
        with dask as address, AirflowServices(work / "airflow-home", {**env, **({"RECAP_DASK_ADDRESS": address}
                                                                               if address else {})}) as af:
            print(f"filter: {'Dask cluster ' + address if address else 'a LocalCluster per task'}")
            t0 = time.perf_counter()
            run_id = af.trigger("recap_pipeline", {"source": str(source)})
            run = af.wait_run("recap_pipeline", run_id, timeout=1800)
            wall = time.perf_counter() - t0
            if run["state"] != "success":
                sys.exit(f"the Airflow run ended {run['state']}: {run['tasks']}")
            quoted = __import__("urllib.request").request.quote(run_id, safe="")
            tis = af.request("GET", f"/api/v2/dags/recap_pipeline/dagRuns/{quoted}/taskInstances?limit=200")
        rows = []
        for t in tis["task_instances"]:
            start, end = _ts(t.get("start_date")), _ts(t.get("end_date"))
            if start and end:
                rows.append((start, end, f"{t['task_id']}" + (f"[{t['map_index']}]" if t["map_index"] >= 0 else "")))
        rows.sort()
        first = rows[0][0]
        busy = sum(end - start for start, end, _ in rows)
        print(f"\n{'task':<22}{'starts at':>10}{'ran':>9}")
        for start, end, name in rows:
            print(f"{name:<22}{start - first:>9.1f}s{end - start:>8.1f}s")
        print(f"\nrecap run (one process)      {cli:8.1f} s")
        print(f"Airflow run, trigger->done   {wall:8.1f} s   ({wall / cli:.2f}x)")
        print(f"  sum of task run times      {busy:8.1f} s over {len(rows)} task instances "
              f"({busy / len(rows):.1f} s each on average)")


if __name__ == "__main__":
    main()
