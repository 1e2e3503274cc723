"""`./dev compose-smoke`: docker-compose.yml end to end. Builds the images with docker or podman,
brings the stack up, runs `recap_pipeline` over Airflow's REST API on the built-in sample shards
with the tiny offline model, checks the published rows, that every row is accounted for and that
the volumes' files are group-writable, opens the run's report through the UI plugin, and tears the
stack down (also on failure or Ctrl-C). Prints `run <run_id>: <state>, <N> rows published`; on
failure exits 1 after the failing service's last log lines.

Where the official base images cannot be pulled, it builds the same Dockerfiles on local stand-ins
(docker/standins/) over a Debian bookworm root filesystem made with debootstrap. With podman as
root on Debian it installs podman, runc, the CNI dnsname plugin and debootstrap when missing.
Images and build caches stay for the next run; containers, networks and volumes go.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
STANDINS = REPO / "docker" / "standins"
PROJECT = os.environ.get("RECAP_SMOKE_PROJECT", "recap-smoke")
STATE = Path(os.environ.get("RECAP_SMOKE_STATE", "/var/tmp/recap-compose-smoke"))
DEBIAN_BASE = "localhost/recap-standin/debian:bookworm"
# Official image -> (stand-in tag, its Dockerfile under docker/standins/).
STANDIN_OF = {"python:3.11-slim-bookworm": ("localhost/recap-standin/python:3.11-slim-bookworm", "python.Dockerfile"),
              "postgres:16": ("localhost/recap-standin/postgres:16", "postgres.Dockerfile")}
PODMAN_PACKAGES = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap",
                   "/usr/lib/cni/dnsname": "golang-github-containernetworking-plugin-dnsname"}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SAMPLE, MODEL = "/data/incoming/compose-smoke", "/models/tiny-llava"
RUN_TIMEOUT_S = int(os.environ.get("RECAP_SMOKE_RUN_TIMEOUT", "1800"))


class SmokeFailed(Exception):
    """A check failed; `service` names the compose service whose logs explain it."""

    def __init__(self, message: str, *services: str):
        super().__init__(message)
        self.services = services


def say(message: str) -> None:
    print(f"compose-smoke: {message}", file=sys.stderr, flush=True)


def sh(*cmd: str, env: dict | None = None, check: bool = True, capture: bool = False, timeout: float | None = None,
       stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, check=check, text=True, timeout=timeout, stdin=stdin,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)


# The engine ---------------------------------------------------------------------------------------

class Engine:
    """docker when `docker info` answers, else podman (as root) with a Docker-compatible socket of
    this run's own for Compose."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.service: subprocess.Popen | None = None
        self.health_stop = threading.Event()
        docker = shutil.which("docker")
        if docker and sh(docker, "info", check=False, capture=True, timeout=30).returncode == 0:
            self.name = "docker"
            return
        self.name = "podman"
        self._install_podman()
        # runc (crun fails on cgroups v1 hybrid hosts); no default ulimits (raising RLIMIT_NOFILE is
        # refused in unprivileged sandboxes). CONTAINERS_CONF applies to this run's podman only.
        conf = STATE / "containers.conf"
        conf.write_text('[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n')
        self.env["CONTAINERS_CONF"] = str(conf)
        sock = STATE / "podman.sock"
        sock.unlink(missing_ok=True)
        self.service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=self.env,
                                        stdout=subprocess.DEVNULL, stderr=open(STATE / "podman-service.log", "w"))
        wait_for(lambda: sock.exists(), 30, "podman's API socket")
        self.env["DOCKER_HOST"] = f"unix://{sock}"

    def _install_podman(self) -> None:
        missing = [pkg for what, pkg in PODMAN_PACKAGES.items()
                   if not (Path(what).exists() if what.startswith("/") else shutil.which(what))]
        if not missing:
            return
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise SmokeFailed(f"no working docker, and podman needs {' '.join(missing)}: install them (Debian: "
                              f"apt-get install {' '.join(missing)}) or start a Docker daemon")
        say(f"installing {' '.join(missing)} (apt-get, as root)")
        sh("apt-get", "update", "-qq")
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture=True)

    def __call__(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return sh(self.name, *args, env=self.env, **kwargs)

    def has_image(self, image: str) -> bool:
        return bool(self.image_id(image))

    def image_id(self, image: str) -> str:
        return self("image", "inspect", "--format", "{{.Id}}", image, check=False, capture=True).stdout.strip()

    def keep_healthchecks_running(self) -> None:
        """podman runs health checks from systemd timers; without systemd (containers, CI) nothing
        runs them and `condition: service_healthy` waits forever: run the pending ones here."""
        if self.name != "podman" or Path("/run/systemd/system").is_dir():
            return

        def loop() -> None:
            while not self.health_stop.wait(3):
                pending = self("ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}", "--filter",
                               "health=starting", "--filter", "health=unhealthy", check=False, capture=True).stdout
                for container in pending.split():
                    self("healthcheck", "run", container, check=False, capture=True)

        threading.Thread(target=loop, daemon=True).start()

    def close(self) -> None:
        self.health_stop.set()
        if self.service and self.service.poll() is None:
            self.service.terminate()
            self.service.wait(30)


def wait_for(ready, timeout: float, what: str, every: float = 1) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SmokeFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# Images --------------------------------------------------------------------------------------------

def base_images(engine: Engine) -> dict[str, str]:
    """Compose variables naming the bases: the official images where present or pullable, else
    stand-ins built here."""
    env = {}
    for official, (standin, dockerfile) in STANDIN_OF.items():
        if engine.has_image(official) or engine("pull", "-q", official, check=False, capture=True,
                                                timeout=300).returncode == 0:
            continue
        if not engine.has_image(standin):
            say(f"{official} cannot be pulled: building the stand-in {standin} (docker/standins/{dockerfile})")
            debian_base(engine)
            engine("build", "-q", "--build-arg", f"DEBIAN_IMAGE={DEBIAN_BASE}", "-t", standin, "-f",
                   str(STANDINS / dockerfile), str(STANDINS), capture=True)
        env["RECAP_POSTGRES_IMAGE" if official.startswith("postgres") else "RECAP_PYTHON_IMAGE"] = standin
    return env


def debian_base(engine: Engine) -> None:
    """localhost/recap-standin/debian:bookworm from debootstrap (minbase), once."""
    if engine.has_image(DEBIAN_BASE):
        return
    if not shutil.which("debootstrap") or os.geteuid() != 0:
        raise SmokeFailed("the stand-in bases need debootstrap, as root (apt-get install debootstrap)")
    mirror = os.environ.get("RECAP_DEBIAN_MIRROR") or apt_mirror()
    say(f"debootstrap bookworm from {mirror} (about a minute)")
    with tempfile.TemporaryDirectory(dir=STATE) as root:
        sh("debootstrap", "--variant=minbase", "bookworm", root, mirror, capture=True)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        engine("import", "-", DEBIAN_BASE, stdin=tar.stdout, capture=True)
        tar.wait()


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    for source in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        text = source.read_text(errors="replace") if source.is_file() else ""
        for word in text.split():
            if word.startswith("http") and word.rstrip("/").endswith("/debian"):
                return word
    return "http://deb.debian.org/debian"


def build_images(engine: Engine, config: dict) -> None:
    """Build each image docker-compose.yml builds, with its own context, Dockerfile and args, plus
    this machine's pip settings as build-time options (never baked in)."""
    built = set()
    for service in config["services"].values():
        build = service.get("build")
        if not build or service["image"] in built:
            continue
        args = {**build.get("args", {}), **pip_build_args(build.get("args", {}))}
        cmd = ["build", "-t", service["image"], "-f", str(Path(build["context"]) / build["dockerfile"])]
        for key, value in args.items():
            cmd += ["--build-arg", f"{key}={value}"]
        if engine.name == "podman":
            cmd += pip_mounts()
        say(f"building {service['image']} ({build['dockerfile']})")
        previous = engine.image_id(service["image"])
        started = time.monotonic()
        log = STATE / f"build-{build['dockerfile'].replace('/', '_')}.log"
        with open(log, "w") as out:
            proc = subprocess.run([engine.name, *cmd, build["context"]], env=engine.env, stdout=out,
                                  stderr=subprocess.STDOUT)
        if proc.returncode:
            raise SmokeFailed(f"building {service['image']} failed; its log: {log}\n"
                              + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        say(f"built {service['image']} in {time.monotonic() - started:.0f} s")
        built.add(service["image"])
        if previous and previous != engine.image_id(service["image"]):
            engine("rmi", previous, check=False, capture=True)  # the build it replaces (its layers stay cached)


def host_pip_setting(name: str) -> list[str]:
    """Values of a pip setting on this machine (environment, then `pip config`)."""
    value = os.environ.get(f"PIP_{name.upper().replace('-', '_')}")
    if value is None:
        out = sh(sys.executable, "-m", "pip", "config", "list", check=False, capture=True).stdout
        value = " ".join(line.split("=", 1)[1].strip("'") for line in out.splitlines()
                         if line.split("=", 1)[0].endswith(f".{name}"))
    return [v for v in value.split() if Path(v).exists()]


def pip_mounts() -> list[str]:
    """The host's CA bundle and wheel folders, read-only at build time (podman `build -v`)."""
    mounts = []
    for i, path in enumerate(host_pip_setting("cert")[:1] + host_pip_setting("find-links")):
        mounts += ["-v", f"{path}:/run/recap-build/{i}:ro"]
    return mounts


def pip_build_args(args: dict) -> dict:
    """PIP_CERT / PIP_FIND_LINKS pointing at the mounts; a CPU index that cannot be reached is
    dropped when the host's wheel folders are there instead."""
    extra = {}
    certs, links = host_pip_setting("cert")[:1], host_pip_setting("find-links")
    if certs:
        extra["PIP_CERT"] = "/run/recap-build/0"
    if links:
        extra["PIP_FIND_LINKS"] = " ".join(f"/run/recap-build/{i + len(certs)}" for i in range(len(links)))
    index = args.get("PIP_EXTRA_INDEX_URL")
    if index and links and not reachable(index):
        say(f"{index} is unreachable: torch comes from this machine's wheel folders ({' '.join(links)})")
        extra["PIP_EXTRA_INDEX_URL"] = ""
    return extra


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=10).close()
        return True
    except (OSError, urllib.error.URLError):
        return False


# The stack -----------------------------------------------------------------------------------------

class Stack:
    """`docker compose -p recap-smoke` over docker-compose.yml, with the engine's socket."""

    def __init__(self, engine: Engine, variables: dict[str, str]):
        self.engine = engine
        self.env = {**engine.env, **variables}
        self.compose = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or "docker-compose"

    def __call__(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return sh(self.compose, "-p", PROJECT, "-f", str(REPO / "docker-compose.yml"), *args, env=self.env, **kwargs)

    def config(self) -> dict:
        return json.loads(self("config", "--format", "json", capture=True).stdout)

    def worker(self, command: str, *, capture: bool = True) -> str:
        """A shell command in a one-off container of the worker image, with the stack's volumes."""
        proc = self("run", "--rm", "--no-deps", "-T", "dask-worker", "sh", "-c", command, check=False,
                    capture=capture)
        if proc.returncode:
            raise SmokeFailed(f"`{command}` in the worker image exited with {proc.returncode}:\n"
                              f"{(proc.stdout or '')[-2000:]}{(proc.stderr or '')[-2000:]}")
        return proc.stdout or ""

    def failing_services(self) -> list[str]:
        """Services with a container that exited non-zero or is unhealthy."""
        proc = self("ps", "-a", "--format", "json", check=False, capture=True)
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip().startswith("{")]
        if len(rows) == 1 and isinstance(rows[0], list):
            rows = rows[0]
        return sorted({r["Service"] for r in rows
                       if (r.get("State") == "exited" and r.get("ExitCode")) or r.get("Health") == "unhealthy"})

    def logs(self, services, lines: int = 40) -> None:
        for service in services:
            print(f"--- {service}: last {lines} log lines ---", file=sys.stderr)
            self("logs", "--no-color", "--tail", str(lines), service, check=False)

    def down(self) -> None:
        self("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, capture=True)


class Airflow:
    """Airflow's REST API and UI plugin through the api-server's published port."""

    def __init__(self, url: str):
        self.url = url
        self.token = ""

    def request(self, method: str, path: str, body: dict | None = None, *, raw: bool = False):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            payload = resp.read()
        return payload if raw else json.loads(payload or b"null")

    def answers(self, path: str) -> bool:
        try:
            self.request("GET", path)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(stack: Stack) -> Airflow:
    say("starting the stack (PostgreSQL, Airflow, Dask)")
    stack.engine.keep_healthchecks_running()
    up = stack("up", "-d", "--no-build", check=False, capture=True)  # its progress lines only on failure
    if up.returncode:
        raise SmokeFailed(f"docker compose up failed:\n{(up.stdout + up.stderr)[-3000:]}", *stack.failing_services())
    airflow = Airflow(f"http://127.0.0.1:{stack.env['RECAP_AIRFLOW_PORT']}")
    wait_for(lambda: airflow.answers("/api/v2/monitor/health"), 300, "the api-server")
    password = json.loads(stack("exec", "-T", "api-server", "cat",
                                "/opt/airflow/simple_auth_manager_passwords.json.generated", capture=True).stdout)
    airflow.token = airflow.request("POST", "/auth/token", {"username": "admin", "password": password["admin"]})[
        "access_token"]
    wait_for(lambda: airflow.answers("/api/v2/dags/recap_pipeline"), 300, "recap_pipeline to be parsed", every=3)
    return airflow


def run_pipeline(stack: Stack, airflow: Airflow) -> tuple[str, dict]:
    say("writing the sample shards and the tiny model to the volumes")
    stack.worker(f"recap make-sample-data {SAMPLE} && recap make-test-model {MODEL}")
    airflow.request("PATCH", "/api/v2/dags/recap_pipeline", {"is_paused": False})
    conf = {"source": f"{SAMPLE}/*.tar", "model": MODEL, "lake": "/lake"}
    run_id = airflow.request("POST", "/api/v2/dags/recap_pipeline/dagRuns", {"logical_date": None, "conf": conf})[
        "dag_run_id"]
    say(f"triggered {run_id}; waiting for it")
    path = f"/api/v2/dags/recap_pipeline/dagRuns/{quote(run_id, safe='')}"
    run: dict = {}

    def finished() -> bool:
        run.update(airflow.request("GET", path))
        return run["state"] in ("success", "failed")

    started = time.monotonic()
    wait_for(finished, RUN_TIMEOUT_S, f"run {run_id}", every=5)
    say(f"run {run_id} finished: {run['state']} in {time.monotonic() - started:.0f} s")
    tis = airflow.request("GET", f"{path}/taskInstances?limit=200")["task_instances"]
    run["tasks"] = {f"{t['task_id']}[{t['map_index']}]": t for t in tis}
    return run_id, run


def check(stack: Stack, airflow: Airflow, run_id: str, run: dict) -> int:
    """The run's checks; returns the published row count."""
    if run["state"] != "success":
        failed = [key for key, t in run["tasks"].items() if t["state"] == "failed"]
        for key in failed:
            t = run["tasks"][key]
            log = airflow.request("GET", f"/api/v2/dags/recap_pipeline/dagRuns/{quote(run_id, safe='')}/taskInstances/"
                                         f"{t['task_id']}/logs/{t['try_number']}?map_index={t['map_index']}"
                                         "&full_content=true", raw=True)
            print(f"--- task {key}: last log lines ---\n" + "\n".join(task_log_lines(log)[-25:]), file=sys.stderr)
        raise SmokeFailed(f"run {run_id}: {run['state']}; failed tasks: {', '.join(failed) or 'none'}",
                          "scheduler", "dask-worker")
    captioned = [key for key, t in run["tasks"].items() if key.startswith("caption_dask[") and t["state"] == "success"]
    if not captioned:
        raise SmokeFailed(f"run {run_id}: no caption_dask task succeeded (runner=dask)", "scheduler")
    status = json.loads(stack.worker("recap status --lake /lake --json --verify"))
    if not status["published"] or not status["balanced"]:
        raise SmokeFailed(f"run {run_id}: {status['published']} rows published, every row accounted for: "
                          f"{status['balanced']}: {json.dumps(status)[:1500]}")
    # Airflow and the Dask workers write the same lake folders: every file is the stack user's, and
    # the lake's are group 0's too (umask 002).
    private = stack.worker("find /lake /models /data/incoming ! -user 50000 | head -5; "
                           "find /lake ! -perm -g=rw | head -5")
    if private.strip():
        raise SmokeFailed(f"files on the volumes that the stack's services cannot share: {private.strip()}")
    page = airflow.request("GET", f"/recap/runs/recap_pipeline/{quote(run_id, safe='')}", raw=True).decode()
    if "<html" not in page[:2000].lower() or html.escape(run_id) not in page:
        raise SmokeFailed(f"the report page of {run_id} is not the run's report: {page[:300]!r}", "api-server")
    return status["published"]


def task_log_lines(payload: bytes) -> list[str]:
    """Lines of a task log as the API returns it (structured JSON content, or text)."""
    try:
        content = json.loads(payload).get("content", [])
    except ValueError:
        return payload.decode(errors="replace").splitlines()
    if isinstance(content, str):
        return content.splitlines()
    return [" ".join(str(e.get(k, "")) for k in ("timestamp", "level", "event") if e.get(k)) for e in content
            if isinstance(e, dict)]


def main() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # tear down on TERM as on Ctrl-C
    engine = stack = None
    try:
        engine = Engine()
        say(f"engine: {engine.name}")
        variables = {**base_images(engine), "RECAP_AIRFLOW_PORT": str(free_port()),
                     "RECAP_DASK_DASHBOARD_PORT": str(free_port())}
        stack = Stack(engine, variables)
        stack.down()  # a previous run's leftovers
        build_images(engine, stack.config())
        airflow = start(stack)
        run_id, run = run_pipeline(stack, airflow)
        rows = check(stack, airflow, run_id, run)
        print(f"run {run_id}: {run['state']}, {rows} rows published")
        say(f"passed in {time.monotonic() - started:.0f} s")
        return 0
    except SmokeFailed as exc:
        if stack is not None:
            stack.logs(exc.services or stack.failing_services() or ["scheduler", "dask-worker"])
        print(f"compose-smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if stack is not None:
            stack.logs(stack.failing_services() or ["api-server", "scheduler", "dask-worker"])
        print(f"compose-smoke: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if stack is not None:
            say("tearing the stack down")
            stack.down()
        if engine is not None:
            engine.close()


if __name__ == "__main__":
    sys.exit(main())
