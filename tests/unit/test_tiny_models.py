"""Tiny checkpoints load through the real HF Auto* path and have the properties tests rely on."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from mvlm.testing.tiny_models import (
    DEFAULT_SYSTEM_PROMPT,
    FAMILIES,
    build_tiny_checkpoint,
    build_tokenizer,
    mrope_section_for,
    tiny_config,
)

VL = ("qwen2_vl", "qwen2_5_vl")


def _text(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    return getattr(config, "text_config", None) or config


def _weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_checkpoint(f, root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_text_family_loads_and_trains(ckpts: dict[str, pathlib.Path], family: str) -> None:
    path = ckpts[family]
    config = transformers.AutoConfig.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert config.vocab_size % 128 != 0 and config.vocab_size >= len(tok)
    assert config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert config.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert config.bos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "four"},
        ],
        tokenize=False,
    )
    batch = tok(text, return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert model.config.tie_word_embeddings is (family == "qwen2")
    if family == "qwen2":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert config.num_experts == 8 and config.num_experts_per_tok == 2
        assert config.norm_topk_prob is True
    gen = transformers.GenerationConfig.from_pretrained(path)
    assert tok.eos_token_id in gen.eos_token_id


@pytest.mark.parametrize("family", VL)
def test_vl_family_loads_and_trains(ckpts: dict[str, pathlib.Path], family: str) -> None:
    path = ckpts[family]
    config = transformers.AutoConfig.from_pretrained(path)
    processor = transformers.AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    text_cfg = config.text_config
    assert text_cfg.vocab_size % 128 != 0 and text_cfg.vocab_size >= len(tok)
    for field, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert getattr(config, field) == tok.convert_tokens_to_ids(token), field
    assert text_cfg.eos_token_id == tok.eos_token_id
    assert text_cfg.pad_token_id == tok.pad_token_id
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    assert sum(text_cfg.rope_parameters["mrope_section"]) == head_dim // 2
    assert config.tie_word_embeddings is False

    image = Image.new("RGB", (90, 60), (200, 30, 30))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "Describe the image."},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    ]
    batch = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt"
    )
    grid = batch["image_grid_thw"]
    merge = config.vision_config.spatial_merge_size
    n_pad = int((batch["input_ids"] == config.image_token_id).sum())
    assert n_pad == int(grid.prod()) // merge**2 > 1
    assert int(grid.prod()) <= 64 * 4  # small pixel budget: at most 28*28*64 px
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad is not None

    # Video path: 4 frames of 56x56 -> grid (2, 4, 4) -> 8 video pad tokens.
    frames = [np.full((56, 56, 3), 40 * i, dtype=np.uint8) for i in range(4)]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": frames},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]
    batch = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
    )
    grid = batch["video_grid_thw"]
    assert grid.tolist() == [[2, 4, 4]]
    n_pad = int((batch["input_ids"] == config.video_token_id).sum())
    assert n_pad == int(grid.prod()) // merge**2
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_chat_template_format() -> None:
    tok = build_tokenizer("qwen2_vl")
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "hi"}],
        }
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    )
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]
    text = tok.apply_chat_template(sys_msgs, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
    # Special tokens are single ids, not split into bytes.
    ids = tok("<|im_start|>user<|image_pad|>")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert tok.decode(tok("The quick brown fox.")["input_ids"]) == "The quick brown fox."


@pytest.mark.parametrize("family", FAMILIES)
def test_variants_divisibility(family: str) -> None:
    for variant, divides in [("default", True), ("indivisible", False)]:
        config = tiny_config(family, variant=variant)
        text = _text(config)
        counts = [text.num_attention_heads, text.num_key_value_heads]
        if family == "qwen3_moe":
            counts.append(text.num_experts)
        # default: TP/EP in {2, 4} divide everything; indivisible: 4 divides nothing
        # (6 heads / 3 KV heads / 6 experts, so TP=2 fails on KV heads, too).
        if divides:
            assert all(c % 4 == 0 for c in counts)
        else:
            assert all(c % 4 != 0 for c in counts) and text.num_key_value_heads == 3
        assert text.vocab_size % 128 != 0
        head_dim = text.hidden_size // text.num_attention_heads
        assert getattr(text, "head_dim", None) in (None, head_dim)
        if family in VL:
            assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
            vc = config.vision_config
            assert (vc.depth, vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size) == (
                2,
                14,
                2,
                2,
            )
            assert (vc.num_heads % 4 == 0) is divides
            if family == "qwen2_5_vl":
                assert vc.out_hidden_size == text.hidden_size
                assert all(0 <= i < vc.depth for i in vc.fullatt_block_indexes)
            else:
                assert vc.hidden_size == text.hidden_size


def test_overrides_reach_text_config() -> None:
    c = tiny_config("qwen2", tie_word_embeddings=False, num_hidden_layers=4)
    assert c.tie_word_embeddings is False and c.num_hidden_layers == 4
    c = tiny_config(
        "qwen2_5_vl",
        tie_word_embeddings=True,
        num_hidden_layers=3,
        hidden_size=256,
        num_attention_heads=8,
        vision_config={"depth": 4, "fullatt_block_indexes": [3]},
    )
    assert c.tie_word_embeddings is True and c.text_config.num_hidden_layers == 3
    assert c.vision_config.out_hidden_size == 256 and c.vision_config.depth == 4
    assert c.text_config.rope_parameters["mrope_section"] == mrope_section_for(32) == [4, 6, 6]
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_config("qwen2", vocab_size=10)
    with pytest.raises(ValueError, match="family"):
        tiny_config("not_a_family")
    with pytest.raises(ValueError, match="variant"):
        tiny_config("qwen2", variant="huge")


def test_determinism_and_random_init(tmp_path: pathlib.Path) -> None:
    a = _weights(build_tiny_checkpoint("qwen2_5_vl", tmp_path / "a", seed=0))
    b = _weights(build_tiny_checkpoint("qwen2_5_vl", tmp_path / "b", seed=0))
    c = _weights(build_tiny_checkpoint("qwen2_5_vl", tmp_path / "c", seed=1))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert not torch.equal(a[name], c[name]), name
        # Nothing constant: norms are 1 + 0.1*randn, biases random.
        assert a[name].numel() == 1 or a[name].std() > 0, name
    # Norm scales (incl. the merger's `ln_q`) are 1 + 0.1*randn: near 1, never all ones.
    norms = [n for n in a if n.endswith("weight") and ("norm" in n or "ln_q" in n)]
    assert any("ln_q" in n for n in norms) and any("norm1" in n for n in norms)
    for n in norms:
        assert abs(a[n].mean().item() - 1.0) < 0.2, n
        assert not torch.allclose(a[n], torch.ones_like(a[n])), n


def test_atomic_overwrite_and_dtype(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "ckpt"
    build_tiny_checkpoint("qwen2", out)
    (out / "stale.txt").write_text("old")
    build_tiny_checkpoint("qwen2", out, dtype=torch.bfloat16, num_hidden_layers=1)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind
    w = _weights(out)
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    assert not any(".layers.1." in n for n in w)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 1


def test_chatml_template_builder_renders_placeholders_and_escapes() -> None:
    """The one ChatML builder behind the tiny families' templates: each media part type renders
    its placeholder, unknown parts vanish, and quotes/newlines in placeholders or the default
    system prompt survive the trip through a Jinja string literal."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from mvlm.testing.tiny_models import chatml_template

    source = chatml_template({("image", "image_url"): "<img>\n", ("audio",): "<a 'x'>"},
                             default_system="It's \\ fine.")
    template = ImmutableSandboxedEnvironment().from_string(source)
    parts = [{"type": "image_url"}, {"type": "audio"}, {"type": "video"},
             {"type": "text", "text": "hi"}, {"type": "image"}]
    text = template.render(messages=[{"role": "user", "content": parts}],
                           add_generation_prompt=True)
    assert text == ("<|im_start|>system\nIt's \\ fine.<|im_end|>\n"
                    "<|im_start|>user\n<img>\n<a 'x'>hi<img>\n<|im_end|>\n"
                    "<|im_start|>assistant\n")
