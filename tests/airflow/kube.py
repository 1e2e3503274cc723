"""An emulated Kubernetes API (kmock) on 127.0.0.1 with a tiny kubelet that runs pods locally.

The kubelet loop plays the node: for each new pod it sets `Pending`, then runs the pod's container
command here (the same argv and env the production pod gets, `python` resolved in this venv, env
from `secretKeyRef`/`envFrom` looked up in the emulated Secrets), reports `Running`, then
`Succeeded`/`Failed` with the exit code, and serves the output as the pod's log.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import threading
from pathlib import Path

import aiohttp
import kmock
import yaml


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Emulator(kmock.KubernetesEmulator):
    """A real API server gives every new pod `status.phase: Pending` at once; so does this one."""

    async def _handle(self, request):
        if (request.action == kmock.action.CREATE and request.resource is not None
                and request.resource.plural == "pods" and isinstance(request.data, dict)):
            request.data.setdefault("status", {"phase": "Pending"})
        return await super()._handle(request)


def _matches(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-separated."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class KubeEmulator:
    """Start with `with KubeEmulator(bin_dir) as kube:`; `kube.kubeconfig` points clients at it."""

    def __init__(self, bin_dir: str | Path, workdir: Path, *, extra_env: dict[str, str] | None = None):
        self.bin_dir = str(bin_dir)  # put first on PATH: `python` is this venv's interpreter
        self.workdir = workdir
        self.extra_env = extra_env or {}
        self.logs: dict[tuple[str, str], bytes] = {}
        self.created: list[dict] = []  # every pod as the API received it
        self.runs: list[dict] = []  # what the kubelet executed: pod name, argv, env, exit code
        self.errors: list[str] = []  # kubelet failures (the pod is marked Failed with the message)
        self.url = ""
        self.kubeconfig = workdir / "kubeconfig"
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="kmock", daemon=True)
        self._error: BaseException | None = None
        self.emulator: kmock.KubernetesEmulator | None = None

    def __enter__(self) -> "KubeEmulator":
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"kmock did not start: {self._error!r}")
        if self._error:
            raise self._error
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "recap"}}],
        }))
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive() and self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._error and not exc[0]:
            raise RuntimeError("the emulated Kubernetes API failed") from self._error

    def pods(self) -> list[dict]:
        """The pods that exist now (not deleted), newest state of each."""
        assert self.emulator is not None
        return [obj.raw for (res, _, _), obj in list(self.emulator.objects.items())
                if res.plural == "pods" and not obj.deleted]

    def _list_pods(self, request) -> dict:
        selector = request.params.get("labelSelector") or ""
        items = [p for p in self.pods() if (request.namespace is None or p["metadata"].get("namespace") ==
                                            request.namespace) and _matches(p["metadata"].get("labels") or {}, selector)]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}

    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        async def create():
            async with aiohttp.ClientSession() as s:
                body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
                r = await s.post(f"{self.url}/api/v1/namespaces/{namespace}/secrets", json=body)
                r.raise_for_status()
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(create(), self._loop).result(10)

    # The emulator's thread ----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with _Emulator() as emulator, kmock.Server(emulator) as server:
            emulator.resources.load_bundled()  # discovery + list of pods/secrets before any exists
            self.emulator = emulator
            self.url = f"http://{server.host}:{server.port}"
            emulator[kmock.subresource("log")] << (lambda request: self.logs.get(
                (request.namespace, request.name), b""))
            # kmock lists ignore labelSelector; the operator finds its own pod by labels.
            emulator[kmock.action.LIST, kmock.resource("v1/pods")] << self._list_pods
            self._ready.set()
            seen: set[tuple[str, str]] = set()
            tasks = []
            async with aiohttp.ClientSession(self.url) as session:
                while not self._stop.is_set():
                    for pod in self.pods():
                        meta = pod.get("metadata", {})
                        key = (meta.get("namespace"), meta.get("name"))
                        if key not in seen:
                            seen.add(key)
                            self.created.append(pod)
                            tasks.append(asyncio.create_task(self._run_pod(session, pod)))
                    try:
                        await asyncio.wait_for(self._stop.wait(), 0.2)
                    except TimeoutError:
                        pass
                for t in tasks:
                    t.cancel()

    async def _set_status(self, session: aiohttp.ClientSession, ns: str, name: str, status: dict) -> None:
        r = await session.patch(f"/api/v1/namespaces/{ns}/pods/{name}/status", json={"status": status},
                                headers={"Content-Type": "application/merge-patch+json"})
        r.release()

    async def _secret_value(self, session: aiohttp.ClientSession, ns: str, name: str) -> dict[str, str] | None:
        r = await session.get(f"/api/v1/namespaces/{ns}/secrets/{name}")
        if r.status != 200:
            r.release()
            return None
        data = (await r.json()).get("data") or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    async def _container_env(self, session: aiohttp.ClientSession, ns: str, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef")
            if ref:
                values = await self._secret_value(session, ns, ref["name"])
                if values is None and not ref.get("optional"):
                    raise RuntimeError(f"secret {ref['name']} not found")
                env.update(values or {})
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = var["value"]
            elif (ref := (var.get("valueFrom") or {}).get("secretKeyRef")):
                values = await self._secret_value(session, ns, ref["name"]) or {}
                if ref["key"] in values:
                    env[var["name"]] = values[ref["key"]]
                elif not ref.get("optional"):
                    raise RuntimeError(f"secret key {ref['name']}/{ref['key']} not found")
        return env

    async def _run_pod(self, session: aiohttp.ClientSession, pod: dict) -> None:
        try:
            await self._kubelet(session, pod)
        except Exception as exc:  # report it as the pod's failure instead of leaving it pending forever
            meta = pod["metadata"]
            self.errors.append(f"{meta['name']}: {type(exc).__name__}: {exc}")
            await self._set_status(session, meta["namespace"], meta["name"], {
                "phase": "Failed", "message": f"kubelet: {type(exc).__name__}: {exc}"})

    async def _kubelet(self, session: aiohttp.ClientSession, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name = meta["namespace"], meta["name"]
        container = spec["containers"][0]
        cname = container["name"]
        await self._set_status(session, ns, name, {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "True"}]})
        try:
            pod_env = await self._container_env(session, ns, container)
        except RuntimeError as exc:
            await self._set_status(session, ns, name, {"phase": "Pending", "containerStatuses": [{
                "name": cname, "ready": False, "restartCount": 0, "image": container["image"], "imageID": "",
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}}]})
            return
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        env = {"PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}", "HOME": str(self.workdir),
               **self.extra_env, **pod_env}
        started = _now()
        await self._set_status(session, ns, name, {"phase": "Running", "startTime": started, "containerStatuses": [{
            "name": cname, "ready": True, "restartCount": 0, "image": container["image"], "imageID": "",
            "started": True, "state": {"running": {"startedAt": started}}}]})
        proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=self.workdir,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        self.logs[(ns, name)] = out
        self.runs.append({"pod": name, "argv": argv, "env": pod_env, "returncode": proc.returncode,
                          "output": out.decode(errors="replace")})
        phase = "Succeeded" if proc.returncode == 0 else "Failed"
        await self._set_status(session, ns, name, {"phase": phase, "containerStatuses": [{
            "name": cname, "ready": False, "restartCount": 0, "image": container["image"], "imageID": "",
            "started": False, "state": {"terminated": {"exitCode": proc.returncode, "startedAt": started,
                                                       "finishedAt": _now(),
                                                       "reason": "Completed" if phase == "Succeeded" else "Error"}}}]})
