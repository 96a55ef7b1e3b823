"""Tiny random-weight Hugging Face checkpoints, built locally, for tests, the demo and benchmarks.

Why this exists: the loaders, converters and data pipeline must be exercised through the *real*
Hugging Face loading path (``Auto*.from_pretrained(dir)``), but nothing may be downloaded. So each
family gets a small config whose sizes are chosen to exercise tensor/expert parallel splits, a
byte-level BPE tokenizer trained here in a few milliseconds with the family's special tokens and a
Qwen-style chat template, and (for VL families) a processor; everything is written with
``save_pretrained`` exactly like a real download.

What a family's tiny model looks like is the family's own business: ``mvlm/models/<name>/tiny.py``
holds a :class:`TinySpec` (config builder, special tokens, HF Auto class, processor), found through
the model registry. This module is the generic part: tokenizer training, sizes per variant,
random weights, the atomic ``save_pretrained`` of a whole checkpoint.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import GenerationConfig, PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "VARIANTS",
    "TinySpec",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "chatml_template",
    "mrope_section_for",
    "tiny_config",
]

VARIANTS = ("default", "indivisible", "bench")

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Small pixel budget so tiny test images give grids of a few patches (28 = patch 14 * merge 2).
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 64

# Not a multiple of 128 on purpose: vocab padding for TP (and trimming on export) must be tested.
TINY_VOCAB_SIZE = 1000
# Target size of the trained byte-level BPE (256 byte symbols + merges), before special tokens.
_BPE_VOCAB_SIZE = 640

# The ChatML specials every tiny tokenizer has (eos = <|im_end|>, pad = bos id = <|endoftext|>);
# a family's TinySpec adds its own (vision tokens, ...) after these.
TEXT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class TinySpec:
    """A family's tiny test model (``mvlm/models/<name>/tiny.py`` defines one as ``TINY``).

    ``config(variant, token_ids, overrides)`` returns the HF config; ``token_ids`` maps every
    special token string of the tokenizer to its id, plus ``bos_token_id`` / ``eos_token_id`` /
    ``pad_token_id`` and ``len`` (tokenizer size). ``processor(tokenizer, config)`` builds the
    checkpoint's processor (None: the tokenizer is saved alone).
    """

    config: Callable[[str, dict[str, int], dict[str, Any]], transformers.PretrainedConfig]
    # specials beyond TEXT_SPECIALS, in vocabulary order
    special_tokens: tuple[str, ...] = ()
    # transformers Auto class that builds the model from the config
    auto_class: str = "AutoModelForCausalLM"
    processor: Callable[[PreTrainedTokenizerFast, transformers.PretrainedConfig], Any] | None = \
        None
    # the tokenizer's chat template and end-of-turn token (None / default: Qwen's ChatML)
    chat_template: str | None = None
    eos_token: str = "<|im_end|>"
    # config overrides for `mvlm demo --model_type <family>` (e.g. a tower input size large
    # enough for the demo's 112 px shapes), merged over the demo's text sizes
    demo_overrides: dict[str, Any] = field(default_factory=dict)
    # rewrites the saved checkpoint directory into the hub's layout where save_pretrained's
    # differs (Qwen3-VL-MoE's fused experts are transposed on the hub); None: as saved
    to_hub_layout: Callable[[pathlib.Path], None] | None = None


def _spec(family: str) -> TinySpec:
    from mvlm.models.registry import get_family

    _check_family(family)
    return get_family(family).tiny_spec()


def _families() -> tuple[str, ...]:
    from mvlm.models.registry import families

    return tuple(f.name for f in families())


def __getattr__(name: str) -> Any:
    # FAMILIES is read off the registry on first use (every registered family has a tiny spec).
    if name == "FAMILIES":
        return _families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def chatml_template(media: dict[tuple[str, ...], str],
                    default_system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """A ChatML chat template (written for this project) whose media parts render as ``media``.

    Why one builder: every tiny family speaks ChatML and differs only in how an image / video /
    audio part is written (Qwen2-VL: ``<|vision_start|><|image_pad|><|vision_end|>``, LLaVA:
    ``<image>``, ...); the family's processor then expands that placeholder to the real token
    count. ``media`` maps the part types a placeholder stands for (e.g. ``("image",
    "image_url")``) to the placeholder text; text parts render as they are, other parts are
    dropped. A conversation without a leading system message gets ``default_system``.
    """

    def literal(text: str) -> str:  # a single-quoted Jinja string literal
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

    branches = "".join(
        ("{%- if " if i == 0 else "{%- elif ")
        + (f"part['type'] == {literal(types[0])}" if len(types) == 1
           else "part['type'] in (" + ", ".join(literal(t) for t in types) + ")")
        + " -%}{{- " + literal(placeholder) + " -}}"
        for i, (types, placeholder) in enumerate(media.items()))
    text_branch = ("{%- elif " if media else "{%- if ") + "part['type'] == 'text' -%}"
    return (
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        "{{- '<|im_start|>system\\n' + " + literal(default_system) + " + '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for part in message['content'] -%}"
        + branches + text_branch +
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


IMAGE_PARTS = ("image", "image_url")

# Qwen2-VL's media parts (the processor expands the single pad token to the real patch count).
CHAT_TEMPLATE = chatml_template({
    IMAGE_PARTS: "<|vision_start|><|image_pad|><|vision_end|>",
    ("video",): "<|vision_start|><|video_pad|><|vision_end|>",
})

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
    return TEXT_SPECIALS + _spec(family).special_tokens


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
    spec = _spec(family)
    backend = Tokenizer.from_str(_trained_tokenizer_json(specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=spec.eos_token,
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[t for t in specials
                                   if t not in (spec.eos_token, "<|endoftext|>")],
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=spec.chat_template or CHAT_TEMPLATE,
    )
    return tokenizer


def _token_ids(family: str) -> dict[str, int]:
    """Special token ids the configs must carry (they must match the tokenizer): every special
    token string -> id, plus bos/eos/pad ids and the tokenizer length."""
    tok = build_tokenizer(family)
    out = {t: tok.convert_tokens_to_ids(t) for t in _special_tokens(family)}
    out.update(
        bos_token_id=out["<|endoftext|>"],
        eos_token_id=out[_spec(family).eos_token],
        pad_token_id=out["<|endoftext|>"],
        len=len(tok),
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

# Vision tower sizes per variant, in neutral names (width = the ViT's hidden size); each family's
# tiny.py writes them under its own config field names.
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
    names = _families()
    if family not in names:
        raise ValueError(f"unknown tiny-model family {family!r}; choose one of {names}")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny-model variant {variant!r}; choose one of {VARIANTS}")


def tiny_config(
    family: str, *, variant: str = "default", **overrides: Any
) -> transformers.PretrainedConfig:
    """The config of a tiny ``family`` model (built by the family's ``tiny.py``).

    ``overrides`` go to the text config (for VL families: keys that are fields of the top-level
    config, such as ``tie_word_embeddings`` or ``image_token_id``, go there, and a
    ``vision_config={...}`` dict is merged into the vision config). The mRoPE section is derived
    from the final head_dim unless ``rope_parameters`` is overridden.
    """
    spec = _spec(family)
    _check_variant(variant)
    return spec.config(variant, _token_ids(family), dict(overrides))


def text_fields(variant: str, ids: dict[str, int], *, moe: bool = False) -> dict[str, Any]:
    """The text-config fields every tiny family shares at ``variant`` (sizes, vocabulary, token
    ids); ``moe`` keeps the expert sizes."""
    sizes = dict(_TEXT_SIZES[variant])
    if not moe:
        for key in _MOE_ONLY_KEYS:
            sizes.pop(key)
    return dict(
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        **sizes,
    )


def vision_sizes(variant: str) -> dict[str, Any]:
    """Vision tower sizes at ``variant`` (depth, width, num_heads, intermediate, fullatt); each
    family writes them under its own config field names."""
    return dict(_VISION_SIZES[variant])


def check_vocab(text: dict[str, Any], ids: dict[str, int]) -> None:
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
    return getattr(transformers, _spec(family).auto_class)


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


def processor_sizes(config: transformers.PretrainedConfig) -> dict[str, Any]:
    """Patch geometry of a Qwen-style vision config with the small pixel budget, so test images
    give tiny grids (the keyword arguments HF's Qwen-VL image/video processors take)."""
    vc = config.vision_config
    return {
        "patch_size": vc.patch_size,
        "temporal_patch_size": vc.temporal_patch_size,
        "merge_size": vc.spatial_merge_size,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    }


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
    spec = _spec(family)
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
        if spec.to_hub_layout is not None:
            spec.to_hub_layout(tmp)
        if spec.processor is not None:
            spec.processor(tokenizer, config).save_pretrained(tmp)
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
