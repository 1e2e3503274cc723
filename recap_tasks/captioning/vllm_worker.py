"""The vLLM engine process behind `VllmCaptioner`: run with the vLLM environment's python.

    $RECAP_VLLM_PYTHON path/to/recap_tasks/captioning/vllm_worker.py

vLLM pins its own torch and transformers, so it lives in its own virtualenv. This file is run by
path and imports only the standard library and what that environment has (vLLM, transformers,
PIL): nothing of recap_tasks, so the vLLM environment needs no install of Recap. Protocol on
stdin/stdout (everything vLLM prints goes to stderr):

  -> one JSON line of settings                   <- {"ready": {...}} or {"error": ...}
     (settings["decoding"]: CaptionConfig.decoding, the explicit decoding the transformers
     backend runs too; each key is translated to vLLM here, an unknown one is an error)
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


# CaptionConfig.decoding's keys this engine applies (vllm_backend refuses a model with others).
DECODING_KEYS = frozenset({"do_sample", "num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty",
                           "no_repeat_ngram_size", "eos_token_id", "pad_token_id"})
GiB = 1 << 30


class _Engine:
    """vLLM's offline engine, stepped by hand so that overlapping calls fill one running batch."""

    def __init__(self, settings: dict):
        from transformers import AutoConfig, AutoProcessor

        model = settings["model"]
        decoding = settings["decoding"]
        unknown = sorted(set(decoding) - DECODING_KEYS)
        if unknown or decoding.get("do_sample") or decoding.get("num_beams", 1) != 1:
            raise ValueError(f"decoding settings this worker cannot apply: {unknown or decoding}")
        processor = AutoProcessor.from_pretrained(model)
        if settings.get("chat_template"):
            processor.chat_template = settings["chat_template"]
        if not getattr(processor, "chat_template", None):
            raise ValueError(f"model {model!r} has no chat template; set caption.chat_template")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": settings["prompt"]}]}]
        self.prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        text_config = AutoConfig.from_pretrained(model).get_text_config()
        import vllm  # after the processor: a model that cannot load fails before this slow import
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
        if cpu:
            # The engine core in this process starts ~30 s sooner; on a GPU, vLLM's default (a
            # separate core process) overlaps preparing new requests with decoding.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

        dtype = settings.get("dtype") or "auto"
        if dtype == "auto":
            dtype = "float32" if cpu else "bfloat16"
        memory = {"gpu_memory_utilization": settings["gpu_memory_utilization"]}
        if cpu:
            memory = _cpu_memory(settings, text_config, dtype)
        # The decoding the transformers backend runs (CaptionConfig.decoding), key by key; greedy.
        # No generation_config of vLLM's own: these settings are all there is.
        no_repeat = int(decoding.get("no_repeat_ngram_size") or 0)
        eos = decoding.get("eos_token_id")
        self.llm = LLM(model=model, dtype=dtype, max_num_seqs=settings["max_num_seqs"],
                       max_model_len=settings.get("max_model_len"), enable_prefix_caching=True,
                       enforce_eager=bool(settings.get("enforce_eager")), generation_config="vllm",
                       logits_processors=[_no_repeat_ngram_processor()] if no_repeat else None,
                       limit_mm_per_prompt={"image": 1}, seed=0,
                       gpu_memory_utilization=memory["gpu_memory_utilization"],
                       kv_cache_memory_bytes=memory.get("kv_cache_memory_bytes"))
        # Tokens are decoded here with the model's own tokenizer (as transformers' batch_decode
        # does), not by the engine's incremental detokenizer.
        self.params = SamplingParams(temperature=0.0, max_tokens=decoding["max_new_tokens"],
                                     min_tokens=decoding.get("min_new_tokens") or 0,
                                     repetition_penalty=float(decoding.get("repetition_penalty") or 1.0),
                                     stop_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
                                     extra_args={"no_repeat_ngram_size": no_repeat} if no_repeat else None,
                                     detokenize=False)
        self.info = {"engine": f"vllm {vllm.__version__}", "dtype": dtype, "memory": memory,
                     "platform": "cpu" if cpu else current_platform.device_name,
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


def _cpu_memory(settings: dict, text_config, dtype: str) -> dict:
    """LLM()'s memory settings on CPU, sized from the memory free now on the engine's NUMA node."""
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # vLLM's own CPU setting: the user sized the KV cache
        return {"gpu_memory_utilization": settings["gpu_memory_utilization"],
                "VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    node = get_memory_node_info(get_allowed_cpu_list()[0].numa_node)
    max_len = settings.get("max_model_len") or getattr(text_config, "max_position_embeddings", None)
    kv_needed = kv_cache_bytes(text_config, settings["max_num_seqs"], max_len, 2 if "16" in dtype else 4)
    return cpu_memory_settings(settings["gpu_memory_utilization"], node.available_memory, node.total_memory,
                               kv_needed)


def cpu_memory_settings(share: float, free: int, total: int, kv_needed: int | None) -> dict:
    """vLLM's CPU backend reads gpu_memory_utilization as a share of all the node's memory and
    refuses to start unless that much is free; caption.gpu_memory_utilization on CPU is a share of
    what is free now. The KV cache is capped at `kv_needed` (all sequences at full length) when
    that leaves at least half of the share for the weights and the runtime."""
    budget = share * max(free, 0)
    out = {"gpu_memory_utilization": round(min(max(budget / total, 1e-4), share), 4), "free_gib": round(free / GiB, 2),
           "share": share}
    if kv_needed and kv_needed <= budget / 2:
        out["kv_cache_memory_bytes"] = int(kv_needed)
    return out


def kv_cache_bytes(text_config, max_num_seqs: int, max_len: int | None, dtype_bytes: int) -> int | None:
    """Bytes of K and V for max_num_seqs sequences of max_len tokens (whole 128-token blocks);
    None when the config does not say (the cap is then left off)."""
    get = (text_config.get if isinstance(text_config, dict) else lambda k: getattr(text_config, k, None))
    layers, heads, hidden = get("num_hidden_layers"), get("num_attention_heads"), get("hidden_size")
    kv_heads, head_dim = get("num_key_value_heads") or heads, get("head_dim")
    if not head_dim and heads and hidden:
        head_dim = hidden // heads
    if not (layers and kv_heads and head_dim and max_len):
        return None
    tokens = max_num_seqs * -(-int(max_len) // 128) * 128
    return 2 * layers * kv_heads * head_dim * dtype_bytes * tokens


def no_repeat_ngram_bans(n: int):
    """transformers' no_repeat_ngram_size for one sequence, kept incrementally: a callable
    (prompt_ids, output_ids) -> the tokens that would repeat an n-gram of prompt + output so far."""
    seen: dict[tuple, set] = {}
    indexed = [0]  # n-grams starting before this position are in `seen`

    def bans(prompt_ids, output_ids) -> set:
        seq_len = len(prompt_ids) + len(output_ids)
        if seq_len + 1 < n:
            return set()
        split = len(prompt_ids)

        def tok(i):
            return prompt_ids[i] if i < split else output_ids[i - split]

        for i in range(indexed[0], seq_len - n + 1):
            seen.setdefault(tuple(tok(j) for j in range(i, i + n - 1)), set()).add(tok(i + n - 1))
        indexed[0] = max(indexed[0], seq_len - n + 1)
        return seen.get(tuple(tok(j) for j in range(seq_len - n + 1, seq_len)), set())

    return bans


def _no_repeat_ngram_processor():
    """A vLLM V1 logits processor applying each request's extra_args["no_repeat_ngram_size"]."""
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class NoRepeatNGram(AdapterLogitsProcessor):
        def is_argmax_invariant(self) -> bool:
            return False

        def new_req_logits_processor(self, params):
            n = int((params.extra_args or {}).get("no_repeat_ngram_size") or 0)
            if n <= 0:
                return None
            bans = no_repeat_ngram_bans(n)

            def apply(prompt_ids, output_ids, logits):
                banned = bans(prompt_ids, output_ids)
                if banned:
                    logits[list(banned)] = float("-inf")
                return logits

            return apply

    return NoRepeatNGram


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # the stdin reader thread may still block in read(): no interpreter teardown
