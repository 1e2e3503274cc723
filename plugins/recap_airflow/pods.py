"""The pod factory: how a caption work unit runs on a Kubernetes GPU node, on a Dask worker, or locally.

Deployment-specific values come from environment variables of the Airflow services (see
`PodSettings`), so the DAG files stay the same across clusters. Imports only the Kubernetes
client models, never recap_tasks or torch: DAG files call this at parse time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from recap_airflow.runners import ENTRYPOINT, local_command, run_dask, run_local

GPU_POOL = os.environ.get("RECAP_GPU_POOL", "recap_gpu")


def _env_json(name: str, default: Any) -> Any:
    raw = os.environ.get(name)
    return json.loads(raw) if raw else default


@dataclass(frozen=True)
class PodSettings:
    """What a caption pod gets; each field has an environment variable (RECAP_...) to override it."""

    # The GPU worker image (docker/worker.Dockerfile); its entry point is `python -m recap_tasks`.
    image: str = "recap-worker:0.1.0"
    namespace: str = "recap"
    # Airflow connection to the cluster; without one, KUBECONFIG / in-cluster config is used.
    kubernetes_conn_id: str = "kubernetes_default"
    service_account: str = "recap-worker"
    # One GPU per pod: the captioner uses a single device, parallelism comes from more pods.
    gpus: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    cpu_request: str = "4"
    memory_request: str = "24Gi"
    memory_limit: str = "48Gi"
    node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    # GPU nodes are usually tainted so that only GPU work lands there.
    tolerations: list[dict[str, str]] = field(default_factory=lambda: [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    # The lake lives on a shared volume mounted at the same path as in Airflow, so lake paths in
    # the run form mean the same thing in the pod (`/lake/...`).
    lake_claim: str = "recap-lake"
    lake_mount: str = "/lake"
    # Model weights are cached across pods on their own volume (HF_HOME points into it).
    models_claim: str = "recap-models"
    models_mount: str = "/models"
    # Object-store credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL...)
    # and the model hub token, from Kubernetes secrets; optional so a PVC-only lake needs neither.
    object_store_secret: str = "recap-object-store"
    hf_token_secret: str = "recap-hf-token"
    run_as_user: int = 10001  # the `recap` user of the worker image
    startup_timeout_s: int = 900  # CUDA images are large: the first pull on a node takes minutes
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "PodSettings":
        env = os.environ if environ is None else environ
        d = cls()
        return cls(
            image=env.get("RECAP_WORKER_IMAGE", d.image),
            namespace=env.get("RECAP_K8S_NAMESPACE", d.namespace),
            kubernetes_conn_id=env.get("RECAP_K8S_CONN_ID", d.kubernetes_conn_id),
            service_account=env.get("RECAP_K8S_SERVICE_ACCOUNT", d.service_account),
            gpus=int(env.get("RECAP_GPUS_PER_POD", d.gpus)),
            cpu_request=env.get("RECAP_POD_CPU", d.cpu_request),
            memory_request=env.get("RECAP_POD_MEMORY", d.memory_request),
            memory_limit=env.get("RECAP_POD_MEMORY_LIMIT", d.memory_limit),
            node_selector=json.loads(env["RECAP_GPU_NODE_SELECTOR"]) if env.get("RECAP_GPU_NODE_SELECTOR")
            else d.node_selector,
            tolerations=json.loads(env["RECAP_GPU_TOLERATIONS"]) if env.get("RECAP_GPU_TOLERATIONS")
            else d.tolerations,
            lake_claim=env.get("RECAP_LAKE_PVC", d.lake_claim),
            lake_mount=env.get("RECAP_LAKE_MOUNT", d.lake_mount),
            models_claim=env.get("RECAP_MODELS_PVC", d.models_claim),
            object_store_secret=env.get("RECAP_OBJECT_STORE_SECRET", d.object_store_secret),
            hf_token_secret=env.get("RECAP_HF_TOKEN_SECRET", d.hf_token_secret),
            startup_timeout_s=int(env.get("RECAP_POD_STARTUP_TIMEOUT", d.startup_timeout_s)),
            extra_env=json.loads(env["RECAP_POD_ENV"]) if env.get("RECAP_POD_ENV") else {},
        )

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise ValueError("gpus must be >= 0")
        if self.run_as_user == 0:
            raise ValueError("caption pods never run as root")

    def env(self) -> dict[str, str]:
        """Plain environment of a caption pod (secrets come separately)."""
        return {"PYTHONUNBUFFERED": "1", "HF_HOME": f"{self.models_mount}/hf", "RECAP_QUIET": "1",
                **self.extra_env}


class CaptionRunnerFactory:
    """Builds the caption stage for a runner: a KubernetesPodOperator, a command on a Dask worker,
    or a local subprocess."""

    def __init__(self, settings: PodSettings | None = None):
        self.settings = settings or PodSettings.from_env()

    # Kubernetes ------------------------------------------------------------------------------

    def pod_kwargs(self) -> dict[str, Any]:
        """KubernetesPodOperator arguments shared by every caption pod (all but `arguments`)."""
        from kubernetes.client import models as k8s

        s = self.settings
        gpu = {s.gpu_resource: str(s.gpus)} if s.gpus else {}
        return {
            "kubernetes_conn_id": s.kubernetes_conn_id,
            "namespace": s.namespace,
            "image": s.image,
            "name": "recap-caption",
            "cmds": list(ENTRYPOINT),
            "labels": {"app.kubernetes.io/name": "recap", "app.kubernetes.io/component": "caption"},
            "env_vars": [k8s.V1EnvVar(name=k, value=v) for k, v in s.env().items()] + [
                k8s.V1EnvVar(name="HF_TOKEN", value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(
                    name=s.hf_token_secret, key="token", optional=True)))],
            "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s.object_store_secret,
                                                                                optional=True))],
            "container_resources": k8s.V1ResourceRequirements(
                requests={"cpu": s.cpu_request, "memory": s.memory_request, **gpu},
                limits={"memory": s.memory_limit, **gpu}),
            "node_selector": dict(s.node_selector),
            "tolerations": [k8s.V1Toleration(**t) for t in s.tolerations],
            "volumes": [
                k8s.V1Volume(name="lake", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name=s.lake_claim)),
                k8s.V1Volume(name="models", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name=s.models_claim)),
                # torch shares tensors between processes through /dev/shm; the default 64 MiB is too small.
                k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="8Gi")),
                k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource()),
            ],
            "volume_mounts": [
                k8s.V1VolumeMount(name="lake", mount_path=s.lake_mount),
                k8s.V1VolumeMount(name="models", mount_path=s.models_mount),
                k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
                k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
            ],
            "service_account_name": s.service_account,
            "automount_service_account_token": False,  # the worker never talks to the API server
            "security_context": k8s.V1PodSecurityContext(
                run_as_user=s.run_as_user, run_as_group=s.run_as_user, fs_group=s.run_as_user,
                run_as_non_root=True, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
            "container_security_context": k8s.V1SecurityContext(
                allow_privilege_escalation=False, read_only_root_filesystem=True, run_as_non_root=True,
                capabilities=k8s.V1Capabilities(drop=["ALL"])),
            "image_pull_policy": "IfNotPresent",
            "startup_timeout_seconds": s.startup_timeout_s,
            "get_logs": True,
            "log_events_on_failure": True,
            # Failed pods stay for `kubectl describe`; succeeded ones are removed.
            "on_finish_action": "delete_succeeded_pod",
            "pool": GPU_POOL,
            "retries": 2,
            "retry_delay": timedelta(minutes=2),
            "execution_timeout": timedelta(hours=12),
        }

    def pod_operator(self, *, task_id: str, arguments: list[str], **overrides: Any):
        """One caption pod (`python -m recap_tasks <arguments>`)."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        return KubernetesPodOperator(task_id=task_id, arguments=arguments, **{**self.pod_kwargs(), **overrides})

    def mapped_pod_operator(self, *, task_id: str, arguments, **overrides: Any):
        """One caption pod per work unit: `arguments` is an XComArg of argument lists."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        return KubernetesPodOperator.partial(task_id=task_id, **{**self.pod_kwargs(), **overrides}).expand(
            arguments=arguments)

    def render_pod(self, arguments: list[str]) -> dict:
        """The pod a work unit would get, rendered without a cluster (dry run)."""
        op = self.pod_operator(task_id="caption_dry_run", arguments=arguments)
        return op.build_pod_request_obj(dry_run=True).to_dict()

    # Dask and local -------------------------------------------------------------------------

    def local_env(self) -> dict[str, str]:
        """The pod environment minus what only makes sense inside the pod (volume paths)."""
        env = self.settings.env()
        env.pop("HF_HOME", None)
        return env

    def run_local(self, arguments: list[str], *, timeout: float | None = None) -> str:
        """Run the pod's command as a subprocess of this worker."""
        return run_local(local_command(arguments), env=self.local_env(), timeout=timeout)

    def run_dask(self, arguments: list[str], *, timeout: float | None = None) -> str:
        """Run the pod's command on a Dask worker that offers the caption resource (the worker image)."""
        return run_dask(arguments, env=self.local_env(), timeout=timeout)
