"""Real Airflow services for tests: api-server, scheduler and dag-processor on a PostgreSQL database
of their own, bound to 127.0.0.1, started and stopped by the test session."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tests.helpers import REPO

PG = {"host": os.environ.get("RECAP_TEST_PGHOST", "127.0.0.1"), "port": os.environ.get("RECAP_TEST_PGPORT", "5432"),
      "user": os.environ.get("RECAP_TEST_PGUSER", "postgres")}


def postgres_available() -> str | None:
    """None when PostgreSQL answers, else why not."""
    if not shutil.which("createdb"):
        return "PostgreSQL client tools (createdb) are not installed"
    try:
        socket.create_connection((PG["host"], int(PG["port"])), timeout=3).close()
    except OSError as exc:
        return f"PostgreSQL is not reachable at {PG['host']}:{PG['port']}: {exc}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowServices:
    """`with AirflowServices(home, extra_env) as af:` -> af.url, af.api(method, path, body)."""

    def __init__(self, home: Path, extra_env: dict[str, str]):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = f"recap_airflow_test_{uuid.uuid4().hex[:8]}"
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN":
                f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{self.db}",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RECAP_QUIET": "1",
            **extra_env,
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.token = ""

    def airflow(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc

    def __enter__(self) -> "AirflowServices":
        subprocess.run(["createdb", "-h", PG["host"], "-p", PG["port"], "-U", PG["user"], self.db], check=True,
                       timeout=60)
        try:
            self.airflow("db", "migrate", timeout=600)
            self.airflow("pools", "set", "recap_gpu", "1", "GPU slots for caption")
            for name in ("api-server", "scheduler", "dag-processor"):
                log = open(self.home / f"{name}.log", "w")
                # The console script, as `airflow standalone` starts its parts: task processes then
                # have it as __main__, which Dask's spawned workers must not re-run (issue 14).
                self.procs[name] = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), name],
                                                    env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                    start_new_session=True)
            self._wait(lambda: self._get_status("/api/v2/monitor/health") == 200, 180, "api-server health")
            password = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
            self.token = self.request("POST", "/auth/token", {"username": "admin", "password": password},
                                      auth=False)["access_token"]
            for dag_id in ("recap_pipeline", "recap_incremental", "recap_report"):
                self._wait(lambda: self._get_status(f"/api/v2/dags/{dag_id}", auth=True) == 200, 240,
                           f"{dag_id} registered by the dag-processor")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        subprocess.run(["dropdb", "--force", "-h", PG["host"], "-p", PG["port"], "-U", PG["user"], "--if-exists",
                        self.db], timeout=60)

    def logs(self, lines: int = 60) -> str:
        out = []
        for name in self.procs:
            text = (self.home / f"{name}.log").read_text(errors="replace").splitlines()
            out.append(f"--- {name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            if ready():
                return
            time.sleep(1)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def _get_status(self, path: str, auth: bool = False) -> int:
        req = urllib.request.Request(self.url + path, headers=self._headers(auth))
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def _headers(self, auth: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def request(self, method: str, path: str, body: dict | None = None, *, auth: bool = True, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers(auth))
        with urllib.request.urlopen(req, timeout=30) as resp:
            payload = resp.read()
        return payload if raw else json.loads(payload or b"null")

    def trigger(self, dag_id: str, conf: dict) -> str:
        run = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 900) -> dict:
        """Poll a run until it finishes; returns the run with its task instance states."""
        deadline = time.monotonic() + timeout
        quoted = urllib.request.quote(run_id, safe="")
        while time.monotonic() < deadline:
            run = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}")
            if run["state"] in ("success", "failed"):
                tis = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances?limit=200")
                run["tasks"] = {f"{t['task_id']}[{t['map_index']}]": t["state"] for t in tis["task_instances"]}
                return run
            time.sleep(3)
        raise TimeoutError(f"{dag_id} {run_id} did not finish in {timeout}s\n{self.logs()}")
