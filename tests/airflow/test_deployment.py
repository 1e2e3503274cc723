"""The deployment files without a Docker engine: the compose file validates, the Dockerfiles lint."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (extra: dev)")
    return path


def test_compose_file_is_valid_and_complete():
    compose = _tool("docker-compose")
    subprocess.run([compose, "-f", str(REPO / "docker-compose.yml"), "config", "-q"], check=True, timeout=60)
    config = json.loads(subprocess.run([compose, "-f", str(REPO / "docker-compose.yml"), "config", "--format",
                                        "json"], check=True, capture_output=True, text=True, timeout=60).stdout)
    services = config["services"]
    assert {"postgres", "api-server", "scheduler", "dag-processor", "triggerer", "dask-scheduler",
            "dask-worker"} <= set(services)
    for name in ("api-server", "scheduler", "dag-processor", "triggerer", "dask-worker"):
        mounts = {(v["source"], v["target"]) for v in services[name]["volumes"]}
        assert ("lake", "/lake") in mounts, name
    for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
        env = services[name]["environment"]
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["RECAP_DASK_ADDRESS"] == "tcp://dask-scheduler:8786"
        assert services[name]["user"] != "root"
    assert "recap_gpu" in " ".join(services["airflow-init"]["command"])
    # Caption runs on the Dask workers, which run the worker image (the pods' image and command).
    worker = services["dask-worker"]
    assert services["api-server"]["environment"]["RECAP_RUNNER"] == "dask"
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile" and "--resources" in worker["command"]
    assert worker["command"][worker["command"].index("--resources") + 1] == "caption=1"
    assert services["dask-scheduler"]["image"] == worker["image"] != services["api-server"]["image"]
    # One uid for every service, in group 0, umask 002: files on the volumes are every service's.
    assert {services[name]["user"] for name in ("api-server", "scheduler", "dask-scheduler", "dask-worker")} == {
        "50000:0"}
    for name in ("api-server", "scheduler", "dask-worker"):
        assert "umask 0002" in " ".join(services[name]["entrypoint"])


def test_compose_images_come_from_variables_with_official_defaults():
    compose = _tool("docker-compose")

    def config(env: dict[str, str]) -> dict:
        return json.loads(subprocess.run([compose, "-f", str(REPO / "docker-compose.yml"), "config", "--format",
                                          "json"], check=True, capture_output=True, text=True, timeout=60,
                                         env={**os.environ, **env}).stdout)["services"]

    default = config({})
    assert default["postgres"]["image"] == "postgres:16"
    assert {default[s]["build"]["args"]["BASE_IMAGE"] for s in ("api-server", "dask-worker")} == \
        {"python:3.11-slim-bookworm"}
    local = config({"RECAP_POSTGRES_IMAGE": "localhost/pg", "RECAP_PYTHON_IMAGE": "localhost/py"})
    assert local["postgres"]["image"] == "localhost/pg"
    assert local["dask-worker"]["build"]["args"]["BASE_IMAGE"] == "localhost/py"


@pytest.mark.parametrize("dockerfile", ["airflow.Dockerfile", "worker.Dockerfile", "standins/python.Dockerfile",
                                        "standins/postgres.Dockerfile"])
def test_dockerfiles_lint_clean_and_run_as_non_root(dockerfile):
    hadolint = _tool("hadolint")
    path = REPO / "docker" / dockerfile
    proc = subprocess.run([hadolint, "--no-color", "--config", str(REPO / "docker" / "hadolint.yaml"), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if "standins" not in dockerfile:  # a stand-in base is the base's business
        users = re.findall(r"^USER\s+(\S+)", path.read_text(), flags=re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0")
        # The base is a build arg whose default is the official image users pull.
        assert re.search(r"^ARG BASE_IMAGE=\S+\nFROM \$\{BASE_IMAGE\}", path.read_text(), flags=re.M)
