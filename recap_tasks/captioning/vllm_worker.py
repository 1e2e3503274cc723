"""The vLLM engine process behind `VllmCaptioner`: run with the vLLM environment's python.

    $RECAP_VLLM_PYTHON path/to/recap_tasks/captioning/vllm_worker.py

vLLM pins its own torch and transformers, so it lives in its own virtualenv. This file is run by
path and imports only the standard library and what that environment has (vLLM, transformers,
PIL): nothing of recap_tasks, so the vLLM environment needs no install of Recap. Protocol on
stdin/stdout (everything vLLM prints goes to stderr):

  -> one JSON line of settings                   <- {"ready": {...}} or {"error": ...}
  -> {"id": n, "sizes": [[w, h], ...]} + raw RGB bytes of those images, back to back
  <- {"id": n, "texts": [...]}, in the order of the images; calls may overlap: all their images
     share one engine (continuous batching), and answers come back as calls finish
  <- {"error": ...} and exit 1 when the engine fails; EOF on stdin: finish the calls, exit 0
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import traceback
from pathlib import Path


def main() -> int:
    # Run by path, Python puts this folder first on sys.path: its modules must not shadow others.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]
    # The protocol gets the real stdout; anything a library prints goes to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    stdin = sys.stdin.buffer
    line = stdin.readline()
    if not line:
        return 0
    try:
        engine = _Engine(json.loads(line))
    except Exception as exc:  # the parent raises it as a RecapError
        traceback.print_exc(file=sys.stderr)
        _send(out, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _send(out, {"ready": engine.info})
    calls: queue.Queue = queue.Queue(maxsize=64)
    threading.Thread(target=_read_calls, args=(stdin, calls), daemon=True, name="recap-vllm-reader").start()
    try:
        engine.serve(calls, lambda msg: _send(out, msg))
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        _send(out, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


def _send(out, msg: dict) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


def _read_calls(stdin, calls: queue.Queue) -> None:
    """Header line + raw RGB bytes -> (id, [PIL images]); None at EOF or on a broken frame."""
    from PIL import Image

    try:
        while line := stdin.readline():
            head = json.loads(line)
            images = []
            for w, h in head["sizes"]:
                data = stdin.read(w * h * 3)
                if len(data) != w * h * 3:
                    raise EOFError("stdin closed inside an image")
                images.append(Image.frombytes("RGB", (w, h), data))
            calls.put((head["id"], images))
    except Exception as exc:
        calls.put(exc)
        return
    calls.put(None)


class _Engine:
    """vLLM's offline engine, stepped by hand so that overlapping calls fill one running batch."""

    def __init__(self, settings: dict):
        from transformers import AutoProcessor, GenerationConfig

        model = settings["model"]
        processor = AutoProcessor.from_pretrained(model)
        if settings.get("chat_template"):
            processor.chat_template = settings["chat_template"]
        if not getattr(processor, "chat_template", None):
            raise ValueError(f"model {model!r} has no chat template; set caption.chat_template")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": settings["prompt"]}]}]
        self.prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # The model's generation_config, as transformers' generate() applies it, where vLLM can.
        min_tokens, repetition_penalty, ignored = settings.get("min_new_tokens"), 1.0, []
        try:
            defaults = GenerationConfig.from_pretrained(model)
        except OSError:
            defaults = None
        if defaults is not None:
            if min_tokens is None:
                min_tokens = defaults.min_new_tokens
            repetition_penalty = defaults.repetition_penalty or 1.0
            ignored = [k for k in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size")
                       if getattr(defaults, k, None) not in (None, 0)]
        import vllm  # after the processor: a model that cannot load fails before this slow import
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # The engine core in this process starts ~30 s sooner; on a GPU, vLLM's default (a
            # separate core process) overlaps preparing new requests with decoding.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

        dtype = settings.get("dtype") or "auto"
        if dtype == "auto":
            dtype = "float32" if current_platform.is_cpu() else "bfloat16"
        self.llm = LLM(model=model, dtype=dtype, max_num_seqs=settings["max_num_seqs"],
                       gpu_memory_utilization=settings["gpu_memory_utilization"],
                       max_model_len=settings.get("max_model_len"), enable_prefix_caching=True,
                       enforce_eager=bool(settings.get("enforce_eager")),
                       limit_mm_per_prompt={"image": 1}, seed=0)
        # Greedy, like the transformers backend; tokens are decoded here with the model's own
        # tokenizer (as transformers' batch_decode does), not by the engine's incremental detokenizer.
        self.params = SamplingParams(temperature=0.0, max_tokens=settings["max_new_tokens"],
                                     min_tokens=min_tokens or 0, repetition_penalty=repetition_penalty,
                                     detokenize=False)
        self.info = {"engine": f"vllm {vllm.__version__}", "dtype": dtype, "min_new_tokens": min_tokens,
                     "platform": "cpu" if current_platform.is_cpu() else current_platform.device_name,
                     "ignored_generation_config": ignored,
                     "revision": getattr(self.llm.llm_engine.model_config, "revision", None)}

    def serve(self, calls: queue.Queue, send) -> None:
        engine = self.llm.llm_engine
        pending: dict[str, tuple[int, int]] = {}  # request id -> (call id, image index)
        results: dict[int, list] = {}
        eof = False
        while not (eof and not pending):
            # Block for work only when the engine has none; otherwise take what has arrived.
            while not eof:
                try:
                    item = calls.get(block=not pending)
                except queue.Empty:
                    break
                if item is None:
                    eof = True
                    break
                if isinstance(item, Exception):
                    raise item
                call_id, images = item
                if not images:
                    send({"id": call_id, "texts": []})
                    continue
                prompts = [{"prompt": self.prompt, "multi_modal_data": {"image": im}} for im in images]
                ids = self.llm.enqueue(prompts, self.params, use_tqdm=False)
                results[call_id] = [None] * len(images)
                # enqueue returns internal ids ("<id>-<8 random chars>"); outputs carry "<id>".
                pending.update({rid.rsplit("-", 1)[0]: (call_id, i) for i, rid in enumerate(ids)})
            if not pending:
                continue
            for output in engine.step():
                if not output.finished:
                    continue
                call_id, i = pending.pop(output.request_id)
                texts = results[call_id]
                texts[i] = self.tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True)
                if all(t is not None for t in texts):
                    send({"id": call_id, "texts": results.pop(call_id)})


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # the stdin reader thread may still block in read(): no interpreter teardown
