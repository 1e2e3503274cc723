"""The deployment files without a Docker engine: the compose file validates, the Dockerfiles lint."""

import json
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


@pytest.mark.parametrize("dockerfile", ["airflow.Dockerfile", "worker.Dockerfile"])
def test_dockerfiles_lint_clean_and_run_as_non_root(dockerfile):
    hadolint = _tool("hadolint")
    path = REPO / "docker" / dockerfile
    proc = subprocess.run([hadolint, "--no-color", "--config", str(REPO / "docker" / "hadolint.yaml"), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    users = re.findall(r"^USER\s+(\S+)", path.read_text(), flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
