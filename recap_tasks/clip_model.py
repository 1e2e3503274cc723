"""A small CLIP trained from scratch, for `recap evaluate clip`: a word-level tokenizer, image
tensors, the training loop and retrieval Recall@K.

The model is transformers' `CLIPModel` from a small random `CLIPConfig` trained with its own
contrastive loss (open_clip would pull another torch and torchvision). torch, transformers,
tokenizers and PIL are imported where used, so the rest of Recap imports without them.
"""

from __future__ import annotations

import io
import math

from recap_tasks.config import EvaluateConfig
from recap_tasks.errors import RecapError
from recap_tasks.export import CaptionMixer
from recap_tasks.runs import progress_bar

RECALL_AT = (1, 5, 10)
_IMAGE_EXTS = ("jpg", "png", "webp", "gif")
_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
# CLIP's image normalisation (OpenAI), as transformers' CLIPImageProcessor applies it.
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def load_torch():
    """torch, or a RecapError saying which extra installs it."""
    try:
        import torch
    except ImportError:
        raise RecapError("evaluate clip needs torch and transformers: install recap[cpu] or recap[gpu]") from None
    return torch


def pick_device(torch, wanted: str) -> str:
    """The device `evaluate.device` names (`auto`: cuda when a GPU is visible, else cpu)."""
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise RecapError(f"evaluate.device={wanted} but no CUDA GPU is visible; use cpu or auto")
    return wanted


def sample_text(sample: dict, field: str) -> str:
    """A webdataset sample's text field (`org.txt`, `re.txt`) as str; empty when absent."""
    return (sample.get(field) or b"").decode("utf-8", "replace")


def build_tokenizer(texts: list[str], config: EvaluateConfig) -> dict:
    """A word-level tokenizer learned from `texts`: {"tokenizer": tokenizers.Tokenizer, "vocab": {...}}."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation(behavior="removed")])
    core.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=config.vocab_size, special_tokens=_SPECIAL))
    vocab = core.get_vocab()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    core.enable_truncation(max_length=config.context_length)
    core.enable_padding(pad_id=vocab["<pad>"], pad_token="<pad>")
    return {"tokenizer": core, "vocab": vocab}


def tokenize(tokenizer: dict, texts: list[str], torch) -> dict:
    encoded = tokenizer["tokenizer"].encode_batch(texts)
    ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}


def image_batch(samples: list[dict], size: int, torch):
    """uint8 [n, 3, size, size]: each image resized on its short side and centre-cropped, as CLIP does."""
    import numpy as np
    from PIL import Image, ImageOps

    out = np.empty((len(samples), 3, size, size), dtype=np.uint8)
    for i, sample in enumerate(samples):
        data = next(sample[ext] for ext in _IMAGE_EXTS if ext in sample)
        with Image.open(io.BytesIO(data)) as im:
            fitted = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(fitted).transpose(2, 0, 1)
    return torch.from_numpy(out)


def _pixels(images, device: str, torch):
    mean = torch.tensor(_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=device).view(1, 3, 1, 1)
    return (images.to(device).float() / 255 - mean) / std


def _model(config: EvaluateConfig, vocab: dict, torch):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    clip = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(vocab), hidden_size=config.width, intermediate_size=4 * config.width,
                                   num_hidden_layers=config.layers, num_attention_heads=config.heads,
                                   max_position_embeddings=config.context_length, pad_token_id=vocab["<pad>"],
                                   bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"]),
        vision_config=CLIPVisionConfig(hidden_size=config.width, intermediate_size=4 * config.width,
                                       num_hidden_layers=config.layers, num_attention_heads=config.heads,
                                       image_size=config.image_size, patch_size=config.patch_size),
        projection_dim=config.embed_dim,
    )
    torch.manual_seed(config.seed)
    return CLIPModel(clip)


def describe_model(config: EvaluateConfig, vocab_size: int) -> str:
    """The model's size in one line, for the evaluation record."""
    return (f"width {config.width}, {config.layers} layers, {config.heads} heads, embed {config.embed_dim}, "
            f"image {config.image_size}px / patch {config.patch_size}, context {config.context_length}, "
            f"vocab {vocab_size}")


def train_clip(train: list[dict], images, tokenizer: dict, p: float, config: EvaluateConfig, device: str, torch):
    """(model, loss per step, share of samples shown their original caption)."""
    model = _model(config, tokenizer["vocab"], torch).to(device).train()
    optimizer, schedule = _optimizer(model, config, torch)
    mixer = CaptionMixer(p_original=p, seed=config.seed)
    order_rng = torch.Generator().manual_seed(config.seed)  # the same batches for every p
    batch_size = min(config.batch_size, len(train))
    order: list[int] = []
    losses, shown_original = [], 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    bar = progress_bar(desc=f"clip p={p:g}", total=config.steps, unit="step")
    for _ in range(config.steps):
        if len(order) < batch_size:  # a new epoch; no sample twice in one batch
            order = torch.randperm(len(train), generator=order_rng).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        texts = [mixer(dict(train[i]))["txt"] for i in idx]
        shown_original += sum(t == sample_text(train[i], "org.txt") for t, i in zip(texts, idx))
        tokens = {k: v.to(device) for k, v in tokenize(tokenizer, texts, torch).items()}
        with autocast:
            loss = model(**tokens, pixel_values=_pixels(images[idx], device, torch), return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    if not all(math.isfinite(v) for v in losses):
        raise RecapError(f"evaluate clip p={p}: the training loss diverged (non-finite); lower "
                         f"evaluate.learning_rate ({config.learning_rate})")
    return model.eval(), losses, shown_original / (config.steps * batch_size)


def _optimizer(model, config: EvaluateConfig, torch):
    """AdamW with no weight decay on biases, norms and the temperature (as OpenCLIP), and its schedule."""
    decay = [w for n, w in model.named_parameters() if w.ndim >= 2 and "logit_scale" not in n]
    rest = [w for n, w in model.named_parameters() if not (w.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.learning_rate)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config.steps))


def _lr_factor(step: int, steps: int) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to zero."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def retrieval_recall(model, images, texts: dict, device: str, torch, chunk: int = 256) -> dict:
    """Recall@K both ways: image i's own text among its top K texts, and text i's image among its top K."""
    with torch.inference_mode():
        img = torch.cat([model.get_image_features(pixel_values=_pixels(images[s:s + chunk], device, torch))
                         .pooler_output.float() for s in range(0, len(images), chunk)])
        txt = torch.cat([model.get_text_features(input_ids=texts["input_ids"][s:s + chunk].to(device),
                                                 attention_mask=texts["attention_mask"][s:s + chunk].to(device))
                         .pooler_output.float() for s in range(0, len(texts["input_ids"]), chunk)])
        sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
        own = sim.diag()
        # Rank = how many candidates score strictly higher than the true pair (0 = top).
        ranks = {"i2t": (sim > own[:, None]).sum(1), "t2i": (sim > own[None, :]).sum(0)}
        return {d: {f"r{k}": round(float((r < k).float().mean()), 4) for k in RECALL_AT} for d, r in ranks.items()}
