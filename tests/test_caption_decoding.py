"""One config, one decoding: the explicit settings both caption backends get, and the vLLM
worker's CPU memory sizing and memory errors. No vLLM needed: the worker's helpers are plain
Python, and the vLLM backend is driven through a stand-in worker that records what it is sent."""

from __future__ import annotations

import importlib.util
import json
import random
import sys

import pytest

from recap_tasks.captioning.transformers_backend import TransformersCaptioner
from recap_tasks.captioning.vllm_backend import WORKER, VllmCaptioner, memory_error, vllm_decoding
from recap_tasks.config import CaptionConfig, model_generation_config
from recap_tasks.errors import RecapError

GiB = 1 << 30


@pytest.fixture(scope="module")
def worker():
    """vllm_worker.py as a module (it imports only the standard library at the top)."""
    spec = importlib.util.spec_from_file_location("recap_vllm_worker_under_test", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decoding_takes_every_greedy_setting_of_the_model(tiny_model):
    settings = CaptionConfig(max_new_tokens=24).decoding(model_generation_config(tiny_model))
    # The test model's no_repeat_ngram_size and min_new_tokens; caption.max_new_tokens over its 48.
    assert settings == {"do_sample": False, "num_beams": 1, "max_new_tokens": 24, "min_new_tokens": 8,
                        "no_repeat_ngram_size": 2, "repetition_penalty": 1.0, "eos_token_id": 3, "pad_token_id": 0}
    assert CaptionConfig(min_new_tokens=3).decoding({"min_new_tokens": 8})["min_new_tokens"] == 3
    # Sampling and beam settings cannot change a greedy caption: left out; a greedy-relevant one stays.
    model = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "num_beams": 4, "max_length": 4096,
             "suppress_tokens": [7], "repetition_penalty": 1.0}
    settings = CaptionConfig().decoding(model)
    assert settings["do_sample"] is False and settings["num_beams"] == 1 and settings["suppress_tokens"] == [7]
    assert not {"temperature", "top_p", "max_length"} & set(settings)


class _Recorder:
    """A stand-in for the vLLM environment's python: records the worker's settings, answers ready."""

    def __init__(self, tmp_path, reply: dict):
        self.log = tmp_path / "settings.json"
        self.python = tmp_path / "fake-vllm-python"
        self.python.write_text(f"#!{sys.executable}\nimport json, sys\n"
                               f"open({str(self.log)!r}, 'w').write(sys.stdin.readline())\n"
                               f"print(json.dumps({reply!r}), flush=True)\nsys.stdin.read()\n")
        self.python.chmod(0o755)

    def settings(self) -> dict:
        return json.loads(self.log.read_text())


def test_both_backends_get_the_same_explicit_decoding(tiny_model, tmp_path):
    fake = _Recorder(tmp_path, {"ready": {"engine": "vllm test", "dtype": "float32"}})
    config = CaptionConfig(max_new_tokens=24, vllm_python=str(fake.python))
    transformers = TransformersCaptioner(str(tiny_model), config)
    with VllmCaptioner(str(tiny_model), config) as vllm:
        sent = fake.settings()
        provenance = json.loads(vllm.provenance()["generation"])
    assert sent["decoding"] == transformers.generation_kwargs() == vllm.decoding
    assert sent["decoding"]["no_repeat_ngram_size"] == 2  # what made vLLM's captions degenerate before
    tf_provenance = json.loads(transformers.provenance()["generation"])
    assert {k: v for k, v in provenance.items() if k not in ("engine", "backend", "revision")} == \
        {k: v for k, v in tf_provenance.items() if k not in ("backend", "revision")}


def test_a_setting_vllm_cannot_apply_is_refused_in_one_line(tiny_model):
    generation = {**model_generation_config(tiny_model), "suppress_tokens": [5, 6]}
    with pytest.raises(RecapError) as err:
        vllm_decoding(str(tiny_model), CaptionConfig(), generation)
    message = str(err.value)
    assert "\n" not in message and "suppress_tokens=[5, 6]" in message and "caption.backend: transformers" in message


def test_the_worker_applies_each_decoding_key_the_backend_lets_through(worker):
    from recap_tasks.captioning import vllm_backend

    assert worker.DECODING_KEYS == vllm_backend.DECODING_KEYS


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_bans_match_transformers(worker, n):
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    rng = random.Random(n)
    for _ in range(30):
        prompt = [rng.randrange(6) for _ in range(rng.randrange(0, 8))]
        output, bans = [], worker.no_repeat_ngram_bans(n)
        for _step in range(12):  # called once per step as the output grows, as vLLM does
            seq = torch.tensor([prompt + output])
            scores = NoRepeatNGramLogitsProcessor(n)(seq, torch.zeros(1, 6))
            expected = {i for i in range(6) if scores[0, i] == float("-inf")}
            assert bans(prompt, output) == expected
            output.append(rng.randrange(6))


def test_cpu_memory_is_sized_from_what_is_free(worker):
    # The machine: 24 GiB, 8.6 free. vLLM's CPU check wants total x share free, which the
    # old setting (0.85 of 24 = 20.4 GiB) failed; a share of the free memory fits.
    total, free = 24 * GiB, int(8.6 * GiB)
    sized = worker.cpu_memory_settings(0.85, free, total, kv_needed=None)
    assert sized["gpu_memory_utilization"] * total <= 0.85 * free * 1.001
    assert "kv_cache_memory_bytes" not in sized
    # A KV cache far smaller than the share: capped at what the sequences can use.
    capped = worker.cpu_memory_settings(0.85, free, total, kv_needed=64 << 20)
    assert capped["kv_cache_memory_bytes"] == 64 << 20
    # Nothing free: a tiny positive share (vLLM's range), and vLLM's own refusal follows.
    assert 0 < worker.cpu_memory_settings(0.85, 0, total, None)["gpu_memory_utilization"] < 0.001


def test_kv_cache_bytes_from_the_model_config(worker, tiny_model):
    text = json.loads((tiny_model / "config.json").read_text())["text_config"]
    # 2 (K, V) x 2 layers x 1 KV head x 32 head size x 4 bytes x 8 sequences x 512 tokens.
    assert worker.kv_cache_bytes(text, 8, 512, 4) == 2 * 2 * 1 * 32 * 4 * 8 * 512
    assert worker.kv_cache_bytes({"hidden_size": 64}, 8, 512, 4) is None


VLLM_CPU_STARTUP = (
    "ValueError: Available memory on node 0 (8.60/24.00 GiB) on startup is less than desired CPU memory "
    "utilization (0.85, 20.40 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the "
    "fraction of CPU memory reserved (despite its name). To resolve: decrease `--gpu-memory-utilization` "
    "(e.g. `--gpu-memory-utilization 0.5`) or reduce CPU memory used by other processes.")


@pytest.mark.parametrize("error, todo", [
    (VLLM_CPU_STARTUP, "lower caption.gpu_memory_utilization"),
    ("ValueError: Available memory on node 0 (3.00/24.00 GiB) on kv cache allocation is less than requested "
     "memory for kv (-0.50/1.00 GiB). Reduce CPU memory used by other processes.",
     "raise caption.gpu_memory_utilization"),
    ("RuntimeError: Engine core initialization failed.\nValueError: No available memory for the cache blocks. Try "
     "increasing `gpu_memory_utilization` when initializing the engine.", "raise caption.gpu_memory_utilization"),
])
def test_memory_refusals_name_our_setting_in_one_line(error, todo, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    message = memory_error(error, CaptionConfig(gpu_memory_utilization=0.85))
    assert message and "\n" not in message
    assert "caption.gpu_memory_utilization=0.85" in message and todo in message and "RECAP_CONFIG" in message
    assert "--gpu-memory-utilization" not in message


def test_a_set_vllm_cpu_kv_cache_space_is_named(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "40")
    message = memory_error("ValueError: Available memory on node 0 (8.60/24.00 GiB) on kv cache allocation is less "
                           "than requested memory for kv (40.00 GiB). Decrease --kv-cache-memory-bytes, "
                           "VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other processes.", CaptionConfig())
    assert "with VLLM_CPU_KVCACHE_SPACE=40 GiB" in message and "lower VLLM_CPU_KVCACHE_SPACE" in message


def test_other_engine_errors_are_not_called_memory():
    assert memory_error("ValueError: Model architectures ['Foo'] are not supported", CaptionConfig()) is None


def test_a_memory_refusal_from_the_worker_is_one_line(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    fake = _Recorder(tmp_path, {"error": VLLM_CPU_STARTUP})
    with pytest.raises(RecapError) as err:
        VllmCaptioner(str(tiny_model), CaptionConfig(vllm_python=str(fake.python)))
    message = str(err.value)
    assert "\n" not in message and message.startswith("vLLM did not start for lack of memory with "
                                                      "caption.gpu_memory_utilization=0.85")
