"""The caption pod, rendered without a cluster (dry run), and the local runner built from the same factory."""

import subprocess
import sys

import pytest

pytest.importorskip("airflow.providers.cncf.kubernetes", reason="the cncf.kubernetes provider is not installed")

from recap_airflow.pods import CaptionRunnerFactory, PodSettings  # noqa: E402
from recap_airflow.runners import caption_arguments, local_command  # noqa: E402

ARGS = caption_arguments(lake="/lake/prod", model="llava-hf/llava-1.5-7b-hf", run_id="manual__2026-11-27T03-00-00",
                         shard_ids=["laion/00000.tar", "laion/00001.tar"], batch_size=16)


@pytest.fixture(scope="module")
def pod() -> dict:
    return CaptionRunnerFactory(PodSettings()).render_pod(ARGS)


def test_command_is_the_recap_tasks_cli(pod):
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python", "-m", "recap_tasks"]
    assert container["args"] == ["caption", "--lake", "/lake/prod", "--model", "llava-hf/llava-1.5-7b-hf",
                                 "--run-id", "manual__2026-11-27T03-00-00", "--shard", "laion/00000.tar",
                                 "--shard", "laion/00001.tar", "--batch-size", "16"]
    assert container["image"] == "recap-worker:0.1.0"
    assert pod["metadata"]["namespace"] == "recap"
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "caption"


def test_gpu_resources_node_selector_and_tolerations(pod):
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1" and resources["requests"]["nvidia.com/gpu"] == "1"
    assert resources["requests"]["cpu"] == "4" and resources["requests"]["memory"] == "24Gi"
    assert resources["limits"]["memory"] == "48Gi"
    assert pod["spec"]["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in [
        {k: v for k, v in t.items() if v is not None} for t in pod["spec"]["tolerations"]]


def test_secrets_env_and_volumes(pod):
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HOME"]["value"] == "/models/hf" and env["PYTHONUNBUFFERED"]["value"] == "1"
    token = env["HF_TOKEN"]["value_from"]["secret_key_ref"]
    assert (token["name"], token["key"], token["optional"]) == ("recap-hf-token", "token", True)
    (env_from,) = container["env_from"]
    assert env_from["secret_ref"]["name"] == "recap-object-store"
    mounts = {m["name"]: m["mount_path"] for m in container["volume_mounts"]}
    assert mounts == {"lake": "/lake", "models": "/models", "dshm": "/dev/shm", "tmp": "/tmp"}
    claims = {v["name"]: (v["persistent_volume_claim"] or {}).get("claim_name") for v in pod["spec"]["volumes"]}
    assert claims["lake"] == "recap-lake" and claims["models"] == "recap-models"


def test_non_root_security_context(pod):
    spec_ctx = pod["spec"]["security_context"]
    assert spec_ctx["run_as_non_root"] is True and spec_ctx["run_as_user"] == 10001
    ctx = pod["spec"]["containers"][0]["security_context"]
    assert ctx["allow_privilege_escalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
    assert ctx["read_only_root_filesystem"] is True
    assert pod["spec"]["automount_service_account_token"] is False


def test_settings_come_from_the_environment():
    settings = PodSettings.from_env({
        "RECAP_WORKER_IMAGE": "registry.example.com/recap-worker:1.2", "RECAP_K8S_NAMESPACE": "ml",
        "RECAP_GPUS_PER_POD": "2", "RECAP_GPU_NODE_SELECTOR": '{"gpu": "h100"}',
        "RECAP_GPU_TOLERATIONS": '[{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]',
        "RECAP_OBJECT_STORE_SECRET": "s3-creds", "RECAP_POD_ENV": '{"NCCL_DEBUG": "WARN"}'})
    pod = CaptionRunnerFactory(settings).render_pod(ARGS)
    container = pod["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/recap-worker:1.2" and pod["metadata"]["namespace"] == "ml"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["spec"]["node_selector"] == {"gpu": "h100"}
    assert pod["spec"]["tolerations"][0]["key"] == "dedicated"
    assert container["env_from"][0]["secret_ref"]["name"] == "s3-creds"
    assert {"name": "NCCL_DEBUG", "value": "WARN", "value_from": None} in container["env"]
    with pytest.raises(ValueError):
        PodSettings(run_as_user=0)


def test_local_runner_runs_the_pod_command_with_this_interpreter():
    cmd = local_command(ARGS)
    assert cmd[0] == sys.executable and cmd[1:] == ["-m", "recap_tasks", *ARGS]
    # The same argv parses in the real CLI: --help after the verb exits 0 and names every option.
    help_text = subprocess.run([*local_command(["caption", "--help"])], capture_output=True, text=True,
                               timeout=120, check=True).stdout
    for option in ("--lake", "--model", "--run-id", "--shard", "--batch-size"):
        assert option in help_text
    env = CaptionRunnerFactory(PodSettings()).local_env()
    assert "HF_HOME" not in env and env["PYTHONUNBUFFERED"] == "1"


def test_form_fields_left_at_default_keep_the_config(tmp_path, monkeypatch):
    """One configuration: the form overrides RECAP_CONFIG only where the user set a field."""
    from recap_airflow.stages import CONFIG_PROFILE, effective_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("filter:\n  chain: datacomp\n  min_image_side: 256\ncaption:\n  batch_size: 32\n")
    monkeypatch.setenv("RECAP_CONFIG", str(cfg))
    default = effective_config(profile=CONFIG_PROFILE, batch_size=None)
    assert (default.filter.chain, default.filter.min_image_side, default.caption.batch_size) == ("datacomp", 256, 32)
    chosen = effective_config(profile="basic", batch_size=4)
    assert (chosen.filter.chain, chosen.filter.min_image_side, chosen.caption.batch_size) == ("basic", 256, 4)
