"""The vLLM captioner: vLLM's offline engine (continuous batching, paged KV cache, prefix caching).

vLLM pins its own torch and transformers, so the engine runs in a worker process started with the
vLLM environment's python (`caption.vllm_python`, env RECAP_VLLM_PYTHON, or this checkout's
.venv-vllm made by `./dev setup-vllm`); see vllm_worker.py for the protocol. This process keeps
everything else: reading, decoding, hygiene, CLIP scores, commits and resume.

`prepare` hands a batch to the engine as soon as its images are decoded (in the caption stage's
decode threads, a few batches ahead), so the engine always has the next batches queued behind the
running one and never waits for a batch's longest caption; `generate` waits for that batch's
captions.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import subprocess
import threading
import weakref
from concurrent.futures import Future
from pathlib import Path

from PIL import Image

from recap_tasks.captioning import Captioner
from recap_tasks.config import CaptionConfig, model_generation_config
from recap_tasks.errors import RecapError

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_worker.py")
REPO = Path(__file__).resolve().parents[2]
# CaptionConfig.decoding's keys the worker translates to vLLM (vllm_worker.DECODING_KEYS).
DECODING_KEYS = frozenset({"do_sample", "num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty",
                           "no_repeat_ngram_size", "eos_token_id", "pad_token_id"})


def vllm_python(config: CaptionConfig) -> Path:
    """The vLLM environment's interpreter: caption.vllm_python, else RECAP_VLLM_PYTHON, else .venv-vllm."""
    if config.vllm_python:
        return Path(config.vllm_python).expanduser()
    if os.environ.get("RECAP_VLLM_PYTHON"):
        return Path(os.environ["RECAP_VLLM_PYTHON"]).expanduser()
    return REPO / ".venv-vllm" / "bin" / "python"


class VllmCaptioner(Captioner):
    """Any LLaVA-style model vLLM supports, by hub id or local path; greedy, the model's chat template."""

    def __init__(self, model: str, config: CaptionConfig):
        self.model_id = model
        self.config = config
        python = vllm_python(config)
        if not python.exists():
            raise RecapError(f"caption.backend=vllm: no vLLM environment at {python} (set caption.vllm_python "
                             "or RECAP_VLLM_PYTHON, or build it with ./dev setup-vllm)")
        hint = "" if Path(model).exists() else " (not a local folder; model hubs may be unreachable offline)"
        try:
            generation = model_generation_config(model)
        except Exception as exc:  # a missing or corrupt model folder: the same error as the engine's
            raise RecapError(f"cannot load captioning model {model!r} with vLLM{hint}: {exc}") from None
        # The one decoding the transformers backend runs too; the worker applies it key by key.
        self.decoding = vllm_decoding(model, config, generation)
        # A bigger call than the engine's batch keeps it full while this process scores and commits.
        self.batch_size = max(config.batch_size, -(-config.max_num_seqs // 2))
        env = dict(os.environ)
        if config.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = config.device.split(":", 1)[1]
        self._proc = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=env)
        self._finalizer = weakref.finalize(self, _stop, self._proc)
        self._stderr = collections.deque(maxlen=40)
        stderr_reader = threading.Thread(target=self._log_stderr, daemon=True, name="recap-vllm-stderr")
        stderr_reader.start()
        self._write = threading.Lock()
        self._futures: dict[int, Future] = {}
        self._next_id = 0
        self._failure: str | None = None
        settings = {"model": model, "prompt": config.prompt, "chat_template": config.chat_template,
                    "decoding": self.decoding, "dtype": config.dtype, "max_num_seqs": config.max_num_seqs,
                    "gpu_memory_utilization": config.gpu_memory_utilization,
                    "enforce_eager": config.vllm_enforce_eager}
        try:
            self._proc.stdin.write((json.dumps(settings) + "\n").encode())
            self._proc.stdin.flush()
        except OSError:
            pass  # the worker died at start: the read below says why
        reply = self._proc.stdout.readline()
        msg = json.loads(reply) if reply.strip() else {"error": f"worker exited with code {self._proc.wait()}"}
        if "ready" not in msg:
            self.close()
            stderr_reader.join(timeout=10)
            memory = memory_error(f"{msg.get('error')}\n" + "\n".join(self._stderr), config)
            if memory:
                raise RecapError(memory)
            raise RecapError(f"cannot load captioning model {model!r} with vLLM{hint}: {msg.get('error')}"
                             f"{self._stderr_tail()}")
        self.info = msg["ready"]
        threading.Thread(target=self._read_replies, daemon=True, name="recap-vllm-replies").start()
        log.info("captioner %s on %s with %s (%s), max_num_seqs %d, memory %s, decoding %s", model,
                 self.info.get("platform"), self.info.get("engine"), self.info.get("dtype"), config.max_num_seqs,
                 self.info.get("memory"), self.decoding)

    def prepare(self, images: list[Image.Image]) -> Future:
        """Send the batch to the engine now; the future resolves to its captions."""
        future: Future = Future()
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        head = {"sizes": [list(im.size) for im in images]}
        with self._write:
            if self._failure:
                raise RecapError(self._failure)
            head["id"] = call_id = self._next_id
            self._next_id += 1
            self._futures[call_id] = future
            try:
                self._proc.stdin.write((json.dumps(head) + "\n").encode())
                for im in images:
                    self._proc.stdin.write(im.tobytes())
                self._proc.stdin.flush()
            except OSError as exc:
                self._futures.pop(call_id, None)
                raise RecapError(f"vLLM worker is gone ({exc}){self._stderr_tail()}") from None
        return future

    def generate(self, prepared: Future) -> list[str]:
        return prepared.result()

    def provenance(self) -> dict:
        generation = {**self.decoding, "prompt_id": self.config.prompt_id, "dtype": self.info.get("dtype"),
                      "revision": self.info.get("revision"), "backend": "vllm", "engine": self.info.get("engine")}
        return {"model": self.model_id, "revision": self.info.get("revision"), "prompt": self.config.prompt,
                "prompt_id": self.config.prompt_id, "generation": json.dumps(generation, sort_keys=True)}

    def close(self) -> None:
        """End the worker: at once if calls are still queued (the stage failed), else cleanly."""
        if self._futures and self._proc.poll() is None:
            self._proc.kill()
        self._finalizer()

    def _read_replies(self) -> None:
        for line in self._proc.stdout:
            msg = json.loads(line)
            if "error" in msg:
                self._fail(f"vLLM engine failed: {msg['error']}")
                return
            future = self._futures.pop(msg["id"], None)
            if future is not None:
                future.set_result(msg["texts"])
        self._fail(f"vLLM worker exited (code {self._proc.wait()})")

    def _fail(self, why: str) -> None:
        with self._write:
            self._failure = why + self._stderr_tail()
            futures, self._futures = self._futures, {}
        for future in futures.values():
            future.set_exception(RecapError(self._failure))

    def _log_stderr(self) -> None:
        for raw in self._proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self._stderr.append(line)
            log.debug("vllm: %s", line)

    def _stderr_tail(self) -> str:
        lines = [s for s in list(self._stderr) if s.strip()][-8:]
        return ("\n  worker log (last lines):\n    " + "\n    ".join(lines)) if lines else ""


def vllm_decoding(model: str, config: CaptionConfig, generation: dict) -> dict:
    """CaptionConfig.decoding for vLLM: the same settings, or one line naming those it cannot apply."""
    decoding = config.decoding(generation)
    unknown = {k: v for k, v in decoding.items() if k not in DECODING_KEYS}
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unknown.items()))
        raise RecapError(f"caption.backend=vllm cannot apply the generation_config setting(s) {listed} of model "
                         f"{model!r} as transformers does: remove them from the model's generation_config.json, "
                         "or use caption.backend: transformers")
    return decoding


# vLLM's refusals for memory: its CPU backend's "Available memory on node ...", its GPU worker's
# "Free memory on device ...", and the KV cache's "No available memory for the cache blocks" /
# "... is larger than the available KV cache memory".
_MEMORY = re.compile(r"(Available memory on node|Free memory on device|No available memory for the cache blocks"
                     r"|available KV cache memory)", re.I)
_TOO_LITTLE = re.compile(r"less than desired|less than requested memory for kv \((?!-)", re.I)


def memory_error(text: str, config: CaptionConfig) -> str | None:
    """One line for a vLLM engine that would not start for memory, naming our setting, not vLLM's
    --gpu-memory-utilization flag; None when `text` (its error and log) is not about memory."""
    found = _MEMORY.search(text or "")
    if not found:
        return None
    line = text[text.rfind("\n", 0, found.start()) + 1:].split("\n", 1)[0]
    what = re.split(r"(?<=[)\w])\. ", line[line.find(found.group(0)):], maxsplit=1)[0].rstrip(".")
    setting = (f"caption.gpu_memory_utilization={config.gpu_memory_utilization:g} (in the config file: --config or "
               "RECAP_CONFIG)")
    cpu_kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if cpu_kv:  # vLLM's CPU KV cache size, which replaces our share
        setting += f" with VLLM_CPU_KVCACHE_SPACE={cpu_kv} GiB"
        todo = ("lower VLLM_CPU_KVCACHE_SPACE, or unset it to size the KV cache from free memory by "
                "caption.gpu_memory_utilization")
    elif _TOO_LITTLE.search(what):  # more was asked for than is free: ask for less, or free memory
        todo = "lower caption.gpu_memory_utilization"
    else:  # the weights leave no room for the KV cache
        todo = "raise caption.gpu_memory_utilization"
    return (f"vLLM did not start for lack of memory with {setting}: {what}; {todo}, "
            "or stop other work using this machine's memory")


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
