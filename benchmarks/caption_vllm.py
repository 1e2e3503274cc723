"""CPU captioning throughput: the vLLM backend against the transformers backend, same run, same images.

Both backends caption the same real JPEGs (../shared/data/coco-mini-wds, else generated ones) with
the tiny LLaVA through the `Captioner` interface the caption stage uses: images decoded and
prepared in background threads a few batches ahead, greedy, fp32, the same `max_new_tokens`, the
model's `no_repeat_ngram_size` off on both sides (the figures in BENCHMARKS.md were taken so; both
backends now apply it, vLLM through a logits processor in Python, which would add its own cost to
vLLM's side), so the captions must match. Engine/model start-up is timed apart from throughput. Needs .venv-vllm
(./dev setup-vllm) or RECAP_VLLM_PYTHON.

Usage:
  python benchmarks/caption_vllm.py [--images 256] [--new-tokens 128] [--batch-size 8] [--max-num-seqs 64] [--rounds 3] [--eager]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RECAP_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB

from _machine import describe  # noqa: E402

from recap_tasks.config import CaptionConfig  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini-wds"


def jpegs(n: int) -> tuple[list[bytes], str]:
    blobs = []
    for shard in sorted(DATA.glob("*.tar")):
        with tarfile.open(shard) as tf:
            blobs += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    if blobs:
        return [blobs[i % len(blobs)] for i in range(n)], f"{DATA.name} ({len(blobs)} distinct JPEGs)"
    from PIL import Image

    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (320 + i % 7 * 16, 240 + i % 5 * 16), (i * 37 % 255, i * 91 % 255, 120)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out, "generated JPEGs"


def run(captioner, blobs: list[bytes], batch_size: int, ahead: int = 2) -> tuple[list[str], float]:
    """What run_caption does: decode + prepare in threads `ahead` batches ahead, then generate."""
    from PIL import Image

    def load(batch):
        return captioner.prepare([Image.open(io.BytesIO(b)).convert("RGB") for b in batch])

    batches = [blobs[i:i + batch_size] for i in range(0, len(blobs), batch_size)]
    texts: list[str] = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load, b) for b in batches[:ahead + 1]]
        for i in range(len(batches)):
            prepared = futures[i].result()
            if i + ahead + 1 < len(batches):
                futures.append(pool.submit(load, batches[i + ahead + 1]))
            texts += captioner.generate(prepared)
    return texts, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="transformers: images per generate() call")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="vLLM: sequences decoded together")
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from recap_tasks.captioning.tiny_model import make_test_model
    from recap_tasks.captioning.transformers_backend import TransformersCaptioner
    from recap_tasks.captioning.vllm_backend import VllmCaptioner

    tmp = Path(tempfile.mkdtemp(prefix="recap-bench-"))
    try:
        model = make_test_model(tmp / "tiny")
        gen = json.loads((model / "generation_config.json").read_text())
        gen.pop("no_repeat_ngram_size", None)
        (model / "generation_config.json").write_text(json.dumps(gen))
        blobs, source = jpegs(args.images)
        config = CaptionConfig(backend="vllm", max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                               max_num_seqs=args.max_num_seqs, device="cpu", vllm_enforce_eager=args.eager)
        import transformers

        t0 = time.perf_counter()
        vllm_captioner = VllmCaptioner(str(model), config)
        starts = {"vllm": time.perf_counter() - t0}
        t0 = time.perf_counter()
        tf_captioner = TransformersCaptioner(str(model), config)
        starts["transformers"] = time.perf_counter() - t0
        backends = {"vllm": (vllm_captioner, vllm_captioner.batch_size,
                             f"{vllm_captioner.info['engine']}, max_num_seqs {args.max_num_seqs}, calls of "
                             f"{vllm_captioner.batch_size}, {'eager' if args.eager else 'torch.compile'}"),
                    "transformers": (tf_captioner, args.batch_size,
                                     f"transformers {transformers.__version__}, static batches of {args.batch_size}")}
        for captioner, size, _ in backends.values():
            run(captioner, blobs[:size], size)  # warm-up
        results = {name: [] for name in backends}
        texts = {}
        for _ in range(args.rounds):  # alternating, so load from elsewhere on the machine hits both
            for name, (captioner, size, _) in backends.items():
                texts[name], seconds = run(captioner, blobs, size)
                results[name].append(len(blobs) / seconds)
        vllm_captioner.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"machine: {describe()}")
    print(f"images: {args.images} from {source}; tiny LLaVA, fp32, greedy, max_new_tokens {args.new_tokens}; "
          f"median of {args.rounds} alternating rounds")
    rates = {}
    for name, per_round in results.items():
        rates[name] = statistics.median(per_round)
        words = sum(len(t.split()) for t in texts[name]) / len(texts[name])
        print(f"{name}: {rates[name]:.1f} images/s (rounds: {', '.join(f'{r:.1f}' for r in per_round)}; "
              f"{words:.0f} words/caption; start {starts[name]:.1f} s; {backends[name][2]})")
    same = sum(a == b for a, b in zip(texts["vllm"], texts["transformers"]))
    print(f"ratio vllm/transformers: {rates['vllm'] / rates['transformers']:.2f}x")
    print(f"identical captions: {same} of {args.images}")

if __name__ == "__main__":
    main()
