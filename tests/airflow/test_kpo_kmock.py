"""The real KubernetesPodOperator runs the caption stage against an emulated Kubernetes API.

`recap_pipeline` runs with `runner=kubernetes` under `dag.test()`; its mapped `caption_pod` task
creates pods through the provider's client on a kmock API server on 127.0.0.1, whose kubelet loop
executes each pod's container command and env here (tests/airflow/kube.py).
"""

import sys
from pathlib import Path

import pytest

from recap_tasks import lake as tables
from recap_tasks.lake import Lake
from recap_tasks.status import lake_status

pytest.importorskip("kmock", reason="kmock is not installed (extra: dev)")

from tests.airflow.kube import KubeEmulator  # noqa: E402
from tests.dags.conftest import dag_test  # noqa: E402



def test_caption_pods_run_through_kubernetes_api(airflow_env, tmp_path, sample_shards, tiny_model):
    lake = tmp_path / "lake"
    with KubeEmulator(Path(sys.executable).parent, tmp_path,
                      extra_env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}) as kube:
        kube.add_secret("recap", "recap-object-store", {"AWS_ACCESS_KEY_ID": "AKIAEMULATED"})
        env = {**airflow_env, "KUBECONFIG": str(kube.kubeconfig),
               "RECAP_WORKER_IMAGE": "recap-worker:test", "RECAP_POD_STARTUP_TIMEOUT": "120"}
        conf = {"source": str(sample_shards), "lake": str(lake), "model": str(tiny_model), "batch_size": 4,
                "runner": "kubernetes"}
        result, logs = dag_test("recap_pipeline", conf, env, timeout=600)
        remaining = kube.pods()
    assert kube.errors == [], kube.errors
    assert result["tasks"]["caption_pod[0]"] == result["tasks"]["caption_pod[1]"] == "success", result
    assert result["tasks"]["caption_local[-1]"] == "skipped"
    assert result["state"].endswith("success"), (result, logs[-3000:])

    # One pod per work unit (one shard each here), made by the pod factory, run with its own argv and env.
    assert len(kube.created) == 2 and len(kube.runs) == 2
    shard_args = sorted(r["argv"][r["argv"].index("--shard") + 1] for r in kube.runs)
    assert shard_args == ["shards/00000.tar", "shards/00001.tar"]
    for pod, run in zip(sorted(kube.created, key=lambda p: p["metadata"]["name"]),
                        sorted(kube.runs, key=lambda r: r["pod"])):
        container = pod["spec"]["containers"][0]
        assert container["image"] == "recap-worker:test"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["metadata"]["labels"]["dag_id"] == "recap_pipeline"
        assert run["argv"][:4] == ["python", "-m", "recap_tasks", "caption"]
        assert run["returncode"] == 0, run["output"][-2000:]
        # env from the pod spec, including the object-store secret the API resolved by reference
        assert run["env"]["AWS_ACCESS_KEY_ID"] == "AKIAEMULATED" and run["env"]["PYTHONUNBUFFERED"] == "1"
    assert remaining == []  # succeeded pods are deleted (on_finish_action=delete_succeeded_pod)

    status = lake_status(Lake(lake))
    assert status["published"] == 18 and status["balanced"]
    models = set(Lake(lake).read(tables.CAPTIONS, ["model"]).column("model").to_pylist())
    assert models == {str(tiny_model)}
