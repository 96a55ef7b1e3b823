"""Tiny random-weight Hugging Face checkpoints, built locally, for tests, the demo and benchmarks.

Why this exists: the loaders, converters and data pipeline must be exercised through the *real*
Hugging Face loading path (``Auto*.from_pretrained(dir)``), but nothing may be downloaded. So each
family gets a small config whose sizes are chosen to exercise tensor/expert parallel splits, a
byte-level BPE tokenizer trained here in a few milliseconds with the family's special tokens and a
Qwen-style chat template, and (for VL families) a processor; everything is written with
``save_pretrained`` exactly like a real download.

Weights are random and *non-trivial* everywhere (norm weights are ``1 + 0.1 * randn``, biases are
random) so a conversion that swaps or drops a tensor changes the logits and gets caught.
"""

from __future__ import annotations

import copy
import functools
import os
import pathlib
import shutil
import tempfile
from typing import Any

import torch
import transformers
from transformers import GenerationConfig, PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "FAMILIES",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "VARIANTS",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "mrope_section_for",
    "tiny_config",
]

FAMILIES = ("qwen2", "qwen3_moe", "qwen2_vl", "qwen2_5_vl")
VARIANTS = ("default", "indivisible", "bench")
VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl")

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Small pixel budget so tiny test images give grids of a few patches (28 = patch 14 * merge 2).
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 64

# Not a multiple of 128 on purpose: vocab padding for TP (and trimming on export) must be tested.
TINY_VOCAB_SIZE = 1000
# Target size of the trained byte-level BPE (256 byte symbols + merges), before special tokens.
_BPE_VOCAB_SIZE = 640

_QWEN_TEXT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_VL_SPECIALS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# A Qwen2-VL style chat template, written for this project. Content is a string or a list of
# parts; image parts become <|vision_start|><|image_pad|><|vision_end|> (the processor expands the
# single pad token to the real patch count), video parts likewise with <|video_pad|>.
CHAT_TEMPLATE = (
    "{%- set default_system = '" + DEFAULT_SYSTEM_PROMPT + "' -%}"
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Small built-in English corpus: enough text for a few hundred BPE merges, no download.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe the image in one sentence. What color is the square in the picture? The square is red.
There are two cats sitting on a wooden table next to a window. The sky is blue and the sun is out.
Count the number of objects in the image and answer with a single number. The answer is three.
You are a helpful assistant. Please answer the question carefully and explain your reasoning.
Training large vision language models requires tensor, pipeline, context and expert parallelism.
The model reads text tokens and image patches, merges them, and predicts the next token.
Question: what is two plus two? Answer: four. Question: what is the capital of France? Paris.
Once upon a time there was a little robot who liked to paint pictures of mountains and rivers.
She walked along the river in the morning and watched the birds flying over the green hills.
This video shows a person riding a bicycle through a park while children play football nearby.
Summarize the following paragraph in plain English, keeping the most important information.
The weather today is sunny with a light breeze from the west and temperatures around twenty.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 2024 3.14 42.
Punctuation, quotes "like this", brackets (and parentheses), colons: semicolons; and dashes -.
def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n
"""


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _special_tokens(family: str) -> tuple[str, ...]:
    _check_family(family)
    if family in VL_FAMILIES:
        return _QWEN_TEXT_SPECIALS + _QWEN_VL_SPECIALS
    return _QWEN_TEXT_SPECIALS


@functools.cache
def _trained_tokenizer_json(specials: tuple[str, ...]) -> str:
    """Train the byte-level BPE once per process; cached as JSON so callers get fresh objects."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so merge counts are well separated (stable ordering across runs).
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    # Special tokens go at the end of the vocab, as in the real Qwen tokenizers.
    tok.add_special_tokens(list(specials))
    return tok.to_str()


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A Qwen-like fast tokenizer for ``family``, trained locally (cached per process).

    eos is ``<|im_end|>`` and pad is ``<|endoftext|>`` (as in the Qwen instruct checkpoints); there
    is no bos token in the tokenizer (Qwen adds none), but configs use ``<|endoftext|>`` as bos id.
    Each call returns a new object, so callers may mutate it freely.
    """
    from tokenizers import Tokenizer

    specials = _special_tokens(family)
    backend = Tokenizer.from_str(_trained_tokenizer_json(specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[t for t in specials if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def _token_ids(family: str) -> dict[str, int]:
    """Special token ids the configs must carry (they must match the tokenizer)."""
    tok = build_tokenizer(family)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _special_tokens(family)}
    out = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "len": len(tok),
    }
    if family in VL_FAMILIES:
        out.update(
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
    return out


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

# Text sizes per variant. default: TP=2/4 divide heads (8), KV heads (4) and experts (8).
# indivisible: 6 heads / 3 KV heads / 6 experts so TP=4 and EP=4 do not divide.
# bench: a mid-size starting point; meant to be scaled with overrides.
_TEXT_SIZES: dict[str, dict[str, Any]] = {
    "default": {
        "hidden_size": 128,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_experts": 8,
        "moe_intermediate_size": 32,
    },
    "indivisible": {
        "hidden_size": 96,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_experts": 6,
        "moe_intermediate_size": 24,
    },
    "bench": {
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_experts": 8,
        "moe_intermediate_size": 512,
    },
}

# Vision tower sizes. Qwen2-VL names the width `embed_dim` (its `hidden_size` is the merger's
# output = text hidden size); Qwen2.5-VL names it `hidden_size` and the output `out_hidden_size`.
_VISION_SIZES: dict[str, dict[str, Any]] = {
    "default": {"depth": 2, "width": 64, "num_heads": 4, "intermediate": 128, "fullatt": [1]},
    "indivisible": {"depth": 2, "width": 48, "num_heads": 3, "intermediate": 96, "fullatt": [1]},
    "bench": {"depth": 4, "width": 512, "num_heads": 8, "intermediate": 1376, "fullatt": [1, 3]},
}

_MOE_ONLY_KEYS = ("num_experts", "moe_intermediate_size")


def mrope_section_for(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width), Qwen's 1/4, 3/8, 3/8."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny-model family {family!r}; choose one of {FAMILIES}")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny-model variant {variant!r}; choose one of {VARIANTS}")


def tiny_config(
    family: str, *, variant: str = "default", **overrides: Any
) -> transformers.PretrainedConfig:
    """The config of a tiny ``family`` model.

    ``overrides`` go to the text config (for VL families: keys that are fields of the top-level
    config, such as ``tie_word_embeddings`` or ``image_token_id``, go there, and a
    ``vision_config={...}`` dict is merged into the vision config). The mRoPE section is derived
    from the final head_dim unless ``rope_parameters`` is overridden.
    """
    _check_family(family)
    _check_variant(variant)
    overrides = dict(overrides)
    ids = _token_ids(family)
    sizes = dict(_TEXT_SIZES[variant])
    if family != "qwen3_moe":
        for key in _MOE_ONLY_KEYS:
            sizes.pop(key)
    text: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        **sizes,
    )
    vision_overrides = overrides.pop("vision_config", None) or {}

    if family in ("qwen2", "qwen3_moe"):
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
        if family == "qwen2":
            # Like the small Qwen2 models (0.5B/1.5B): embeddings tied to the LM head.
            text.update(tie_word_embeddings=True, use_sliding_window=False)
            text.update(overrides)
            _check_vocab(text, ids)
            return transformers.Qwen2Config(**text)
        text.update(
            tie_word_embeddings=False,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=0.001,
        )
        text.update(overrides)
        # Qwen3 has an explicit head_dim (default 128 in HF): derive it from the final sizes.
        text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
        _check_vocab(text, ids)
        return transformers.Qwen3MoeConfig(**text)

    # VL families.
    config_cls = (
        transformers.Qwen2VLConfig if family == "qwen2_vl" else transformers.Qwen2_5_VLConfig
    )
    top_fields = {
        "tie_word_embeddings",
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
    }
    top: dict[str, Any] = {k: overrides.pop(k) for k in list(overrides) if k in top_fields}
    text.update(overrides)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if "rope_parameters" not in overrides:
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": mrope_section_for(head_dim),
        }
    _check_vocab(text, ids)
    v = _VISION_SIZES[variant]
    if family == "qwen2_vl":
        vision: dict[str, Any] = {
            "depth": v["depth"],
            "embed_dim": v["width"],
            "num_heads": v["num_heads"],
            "mlp_ratio": v["intermediate"] // v["width"],
            "hidden_size": text["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        }
    else:
        vision = {
            "depth": v["depth"],
            "hidden_size": v["width"],
            "num_heads": v["num_heads"],
            "intermediate_size": v["intermediate"],
            "out_hidden_size": text["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            # 56 px = 2 merged units per window side: small images still split into windows.
            "window_size": 56,
            "fullatt_block_indexes": list(v["fullatt"]),
            "tokens_per_second": 2,
        }
    vision.update(vision_overrides)
    cfg = {
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["image_token_id"],
        "video_token_id": ids["video_token_id"],
        "vision_start_token_id": ids["vision_start_token_id"],
        "vision_end_token_id": ids["vision_end_token_id"],
        "tie_word_embeddings": False,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }
    cfg.update(top)
    return config_cls(**cfg)


def _check_vocab(text: dict[str, Any], ids: dict[str, int]) -> None:
    if text["vocab_size"] < ids["len"]:
        raise ValueError(
            f"vocab_size={text['vocab_size']} is smaller than the tokenizer ({ids['len']} tokens);"
            f" pass vocab_size >= {ids['len']}"
        )


def _text_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    return getattr(config, "text_config", None) or config


# ----------------------------------------------------------------------------------------------
# Checkpoint
# ----------------------------------------------------------------------------------------------


def _model_class(family: str) -> type:
    if family in VL_FAMILIES:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


@torch.no_grad()
def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with seeded random values, in the parameter's own dtype.

    One generator walks the parameters in their registration order, so the same seed gives
    identical tensors. Norm weights are 1 + 0.1*randn (not all-ones) and biases are random, so a
    swapped or dropped tensor anywhere changes the output. Tied parameters appear once.
    """
    # Norm scales, found by module type rather than name (Qwen2-VL's merger norm is `ln_q`).
    norm_scales = {
        id(module.weight)
        for module in model.modules()
        if _is_norm(module) and isinstance(getattr(module, "weight", None), torch.Tensor)
    }
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if id(param) in norm_scales:
            noise.mul_(0.1).add_(1.0)
        else:
            noise.mul_(0.02)
        param.copy_(noise)
        del noise


def _is_norm(module: torch.nn.Module) -> bool:
    """LayerNorm or any RMSNorm-style module (HF families define their own norm classes)."""
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or (
        "Norm" in type(module).__name__ and "Batch" not in type(module).__name__
    )


def _generation_config(config: transformers.PretrainedConfig) -> GenerationConfig:
    text = _text_config(config)
    return GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=[text.eos_token_id, text.pad_token_id],
        pad_token_id=text.pad_token_id,
        do_sample=False,
    )


def _build_processor(
    family: str, tokenizer: PreTrainedTokenizerFast, config: transformers.PretrainedConfig
) -> Any:
    """The family's processor with a small pixel budget so test images give tiny grids."""
    vc = config.vision_config
    common = {
        "patch_size": vc.patch_size,
        "temporal_patch_size": vc.temporal_patch_size,
        "merge_size": vc.spatial_merge_size,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    }
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = _image_processor(common)
    # cap_pixels_per_frame=True: the qwen-vl-utils behaviour (and HF's announced default); being
    # explicit also silences transformers' per-call deprecation warning.
    video_processor = Qwen2VLVideoProcessor(**common, cap_pixels_per_frame=True)
    cls = (
        transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
    )
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _image_processor(kwargs: dict[str, Any]) -> Any:
    """The torchvision ("fast") image processor; the PIL one if the fast one cannot be built."""
    try:
        return transformers.Qwen2VLImageProcessor(**kwargs)
    except (ImportError, RuntimeError, ValueError):  # pragma: no cover - depends on torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        return Qwen2VLImageProcessorPil(**kwargs)


def build_tiny_checkpoint(
    family: str,
    out_dir: str | os.PathLike[str],
    *,
    variant: str = "default",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config_overrides: Any,
) -> pathlib.Path:
    """Write a random-weight ``family`` checkpoint to ``out_dir`` via ``save_pretrained``.

    The directory holds config, generation config, safetensors weights, tokenizer (with chat
    template) and, for VL families, the processor, so ``Auto*.from_pretrained(out_dir)`` works as
    on a real download. The build goes into a temp dir beside ``out_dir`` and is renamed into place,
    so a crash leaves no half-written checkpoint; an existing ``out_dir`` is replaced.

    Memory: weights are allocated once, directly in ``dtype`` (no fp32 copy, no HF init pass) and
    saved in ~500 MB shards, so peak RAM stays well under 2x the model size.
    """
    config = tiny_config(family, variant=variant, **config_overrides)
    out = pathlib.Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)

    torch.manual_seed(seed)
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = _model_class(family).from_config(copy.deepcopy(config), dtype=dtype)
    # no_init_weights also skips HF's tying step; tie before filling so tied weights stay one.
    model.tie_weights()
    _randomize_(model, seed)
    model.generation_config = _generation_config(model.config)

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size="500MB")
        del model
        if family in VL_FAMILIES:
            _build_processor(family, tokenizer, config).save_pretrained(tmp)
        else:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
