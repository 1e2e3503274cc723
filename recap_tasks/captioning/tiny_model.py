"""A tiny randomly initialised LLaVA captioner built from real transformers classes.

It exists so tests and the offline demo exercise the production code path (AutoProcessor +
AutoModelForImageTextToText, chat template, batched greedy generation) without a model hub. Its
vocabulary is English words, so its random output reads as (meaningless) sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

# A word-level vocabulary: common caption words, so random weights decode to readable text.
_WORDS = """
a an the of in on with and at near by under over behind beside from to for is are sitting standing
lying walking running holding wearing looking next top front small large big little old young tall
red blue green yellow white black brown gray orange pink purple wooden metal glass plastic bright
dark sunny cloudy snowy wet dry busy quiet empty full round square long short open closed
man woman person people child boy girl group crowd player rider chef family friends couple
dog cat horse bird cow sheep bear elephant giraffe zebra duck fish animal
car bus truck train bicycle motorcycle boat airplane road street bridge sign traffic light
table chair bed couch bench desk shelf window door wall floor ceiling room kitchen bathroom
plate bowl cup bottle glass fork knife spoon pizza sandwich cake banana apple orange vegetables
tree grass flowers field park garden beach ocean water river lake mountain sky clouds snow sand
building house tower city town market shop store stadium station fence pole clock umbrella
ball kite frisbee skateboard surfboard skis racket bat phone laptop computer screen book bag
shirt jacket hat dress shoes helmet glasses photo picture image view scene background foreground
day night morning evening sunlight shadow detail texture pattern color colors side corner edge
""".split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{{ '\\n' }}"
    "{% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_test_model(out_dir: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny LLaVA (CLIP vision tower + Llama decoder) with processor to `out_dir`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(set(_WORDS)))}
    for ch in ".,:!?\n":
        vocab.setdefault(ch, len(vocab))
    for word in ("USER", "ASSISTANT", "Please", "generate", "detailed", "caption", "this", "be", "as",
                 "descriptive", "possible"):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation(behavior="isolated")])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})

    patch = 8
    image_seq_length = (image_size // patch) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=image_size, patch_size=patch),
        # Head size 32 (2 heads, 1 KV head): vLLM's CPU attention kernels take 32, 64, 80, 96, ... only.
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                max_position_embeddings=512, pad_token_id=vocab["<pad>"],
                                bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"]),
        image_token_index=vocab["<image>"],
        image_seq_length=image_seq_length,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=vocab["<pad>"],
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random weights rarely pick </s>, but a floor keeps a caption from ever being empty.
    model.generation_config.min_new_tokens = 8
    model.generation_config.max_new_tokens = 48
    model.generation_config.do_sample = False
    # Greedy decoding on random weights loops on one word; this keeps the demo's output readable.
    model.generation_config.no_repeat_ngram_size = 2
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    model.generation_config.bos_token_id = vocab["<s>"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE, image_token="<image>")
    model.save_pretrained(out)
    _vision_weights_as_released(out)
    processor.save_pretrained(out)
    (out / "RECAP_TEST_MODEL.json").write_text(json.dumps({
        "what": "tiny randomly initialised LLaVA for tests and offline demos; its captions are meaningless",
        "seed": seed, "parameters": sum(p.numel() for p in model.parameters()),
    }, indent=2))
    return out


def _vision_weights_as_released(out: Path) -> None:
    """Name the vision tower's weights as released LLaVA checkpoints do (`vision_tower.vision_model.*`).

    transformers 5 saves them as `vision_tower.embeddings.*` and loads either form; vLLM loads only
    the released one, so the same folder then serves both backends.
    """
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    weights = load_file(path)
    renamed = {("vision_tower.vision_model." + k.removeprefix("vision_tower.")
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in weights.items()}
    save_file(renamed, path, metadata={"format": "pt"})
