"""GPU captioning throughput of our transformers backend on the production architecture.

Builds LLaVA-1.5 with a LLaMA-3-8B-sized decoder (CLIP ViT-L/14 at 336 px -> 576 image tokens,
4096 hidden, 32 layers, GQA 32/8 heads, 14336 MLP, 128k vocabulary) with random weights directly on
the GPU in bf16 (no download), reads real JPEGs from webdataset shards, forces exactly N new tokens
per image (min_new_tokens = max_new_tokens) and prints:
  - images/s end to end (tar read + JPEG decode + preprocessing in background threads, overlapped
    with generation, exactly as `recap caption` does);
  - decode-only throughput (tokens/s of the generate loop on prepared inputs, prefill excluded);
  - model FLOP utilisation against the card's bf16 dense peak (--peak-tflops).

Usage:
  python benchmarks/caption_gpu.py --images 512 --batch-size 64          # on a GPU
  python benchmarks/caption_gpu.py --tiny                                # CPU smoke test (CI)
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RECAP_QUIET", "1")

from _machine import describe  # noqa: E402

from recap_tasks.captioning.tiny_model import CHAT_TEMPLATE  # noqa: E402
from recap_tasks.captioning.transformers_backend import TransformersCaptioner  # noqa: E402
from recap_tasks.config import CaptionConfig  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini-wds"


def production_model(device: str):
    """LLaVA-1.5 + LLaMA-3-8B shapes, random bf16 weights made on `device`, and a matching processor."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    words = [f"w{i}" for i in range(128256 - len(specials))] + ["USER:", "ASSISTANT:"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>", padding_side="left",
                                        extra_special_tokens={"image_token": "<image>"})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                max_position_embeddings=8192, rope_theta=500000.0,
                                pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"]),
        image_token_index=vocab["<image>"], image_seq_length=576, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=vocab["<pad>"],
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token="<image>")
    return model, processor


def read_jpegs(folder: Path, n: int) -> list[bytes]:
    blobs = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.name.endswith(".jpg"):
                    blobs.append(tf.extractfile(m).read())
    if not blobs:
        sys.exit(f"no JPEGs in {folder}")
    return [blobs[i % len(blobs)] for i in range(n)]


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=70)
    parser.add_argument("--decode-workers", type=int, default=8)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM: 989)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model on CPU (smoke test)")
    args = parser.parse_args()

    import torch
    from PIL import Image

    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu:  # CPU smoke test: the same code path on the tiny model
        from recap_tasks.captioning.tiny_model import make_test_model

        args.images, args.batch_size, args.new_tokens = min(args.images, 16), min(args.batch_size, 4), \
            min(args.new_tokens, 8)
        tmp = tempfile.mkdtemp(prefix="recap-bench-")
        model_id = str(make_test_model(Path(tmp) / "tiny"))
        config = CaptionConfig(batch_size=args.batch_size, min_new_tokens=args.new_tokens,
                               max_new_tokens=args.new_tokens, device="cpu")
        captioner = TransformersCaptioner(model_id, config)
        card = "CPU (tiny model smoke test)"
    else:
        t0 = time.perf_counter()
        model, processor = production_model("cuda")
        print(f"built production-shaped model in {time.perf_counter() - t0:.0f} s", flush=True)
        config = CaptionConfig(batch_size=args.batch_size, min_new_tokens=args.new_tokens,
                               max_new_tokens=args.new_tokens, device="cuda", dtype="bfloat16")
        captioner = TransformersCaptioner("random-llava-1.5-llama-3-8b", config, loaded=(model, processor))
        card = torch.cuda.get_device_name(0)
    model = captioner.model
    vision_params = count_params(model.model.vision_tower) + count_params(model.model.multi_modal_projector)
    text_params = count_params(model.model.language_model) + count_params(model.lm_head)
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"no data at {data}: this benchmark reads webdataset shards of JPEGs")
    blobs = read_jpegs(data, args.images + args.batch_size)
    warm, blobs = blobs[: args.batch_size], blobs[args.batch_size:]

    def load(batch: list[bytes]):
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch]
        return captioner.prepare(images)

    captioner.generate(load(warm))  # warm-up: kernels, allocator, cuDNN autotune
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    # End to end: decode + preprocessing in threads, a few batches ahead of generation.
    batches = [blobs[i:i + args.batch_size] for i in range(0, len(blobs), args.batch_size)]
    sync()
    t0 = time.perf_counter()
    tokens = 0
    with ThreadPoolExecutor(args.decode_workers) as pool:
        futures = [pool.submit(load, b) for b in batches[:3]]
        for i in range(len(batches)):
            prepared = futures[i].result()
            if i + 3 < len(batches):
                futures.append(pool.submit(load, batches[i + 3]))
            texts = captioner.generate(prepared)
            tokens += sum(len(t.split()) for t in texts)
    sync()
    e2e = time.perf_counter() - t0
    images_per_s = len(blobs) / e2e

    # Decode only: one prepared batch, full generation minus prefill (a 1-token generation).
    prepared = load(batches[0])
    prompt_len = int(prepared["input_ids"].shape[1])
    n = int(prepared["input_ids"].shape[0])
    full_kwargs = captioner.generation_kwargs()
    one_kwargs = {**full_kwargs, "min_new_tokens": 1, "max_new_tokens": 1}
    inputs = {k: v.to(captioner.device) for k, v in prepared.items()}

    def timed_generate(kwargs) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, **kwargs)
        sync()
        return time.perf_counter() - t

    t_full, t_prefill = timed_generate(full_kwargs), timed_generate(one_kwargs)
    decode_tok_s = n * (args.new_tokens - 1) / max(t_full - t_prefill, 1e-9)

    # FLOPs per image: vision tower on 577 patches, decoder over prompt + generated tokens.
    flops = 2 * vision_params * 577 + 2 * text_params * (prompt_len + args.new_tokens)
    achieved = flops * images_per_s / 1e12
    print(f"machine: {describe()}")
    print(f"device: {card}")
    print(f"model: vision+projector {vision_params / 1e6:.1f}M, decoder {text_params / 1e9:.2f}B parameters; "
          f"prompt {prompt_len} tokens, {args.new_tokens} new tokens per image, batch {args.batch_size}")
    print(f"end-to-end: {images_per_s:.2f} images/s ({len(blobs)} images in {e2e:.1f} s, words decoded {tokens})")
    print(f"decode-only: {decode_tok_s:.0f} tokens/s ({n} sequences; prefill {t_prefill:.2f} s of {t_full:.2f} s)")
    if gpu:
        print(f"model FLOP utilisation: {100 * achieved / args.peak_tflops:.1f}% "
              f"({achieved:.0f} TFLOP/s of {args.peak_tflops:.0f})")
    else:
        print(f"model FLOP utilisation: n/a on CPU ({achieved * 1e3:.2f} GFLOP/s)")


if __name__ == "__main__":
    main()
