"""TextArch options (issue 10): each one matches Hugging Face exactly, or is refused by name.

* RoPE frequencies of every variant mvlm builds (default, partial rotary, linear, llama3, YaRN
  with and without mscale) equal transformers' own rotary modules bit for bit, and so does YaRN's
  cos/sin factor;
* the norms (LayerNorm, zero-centred RMSNorm = Gemma's, zero-centred LayerNorm = Nemotron's
  LayerNorm1P) equal the HF modules bit for bit;
* end to end through ``mvlm convert`` (fp32, TP1, ``--verify`` against transformers, export back
  compared tensor by tensor) on two HF architectures no mvlm family uses, registered here as
  test-only families with nothing but a ``TextArch`` reader and a weight table:
  StarCoder2 (LayerNorm with biases, ungated ``gelu_pytorch_tanh`` MLP ``c_fc``/``c_proj``, biases
  on every linear: Megatron-Core's ``add_bias_linear``) and Nemotron (LayerNorm1P, ungated
  ``relu2``, ``partial_rotary_factor`` 0.5, ``attention_bias`` without ``mlp_bias``: o_proj bias
  but a bias-free MLP, which Megatron-Core's single switch cannot say);
* options without an exact equivalent fail naming the HF field.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Measured 2026-12-02 (fp32, TP1, CPU): StarCoder2 3.6e-7, Nemotron 0.0.
LOGITS_TOL = 1e-6

ROPE_CASES = {
    "default": ("llama", {"rope_type": "default", "rope_theta": 500000.0}),
    "partial": ("nemotron", {"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.5}),
    "linear": ("llama", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3": ("llama", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}),
    "yarn": ("llama", {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                       "original_max_position_embeddings": 32768}),
    "yarn_mscale": ("llama", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 32.0,
                              "original_max_position_embeddings": 4096, "mscale": 1.0,
                              "mscale_all_dim": 0.707, "beta_fast": 16, "truncate": False}),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_frequencies_equal_transformers(case):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.nemotron.modeling_nemotron import NemotronRotaryEmbedding

    from mvlm.models.rope import rope_from_hf, rope_inv_freq

    family, params = ROPE_CASES[case]
    kw = dict(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
              rope_parameters=dict(params))
    if family == "llama":
        cfg, rope = transformers.LlamaConfig(**kw), LlamaRotaryEmbedding
    else:
        cfg, rope = transformers.NemotronConfig(**kw), NemotronRotaryEmbedding
    ref = rope(cfg)
    theta, scaling, partial, _ = rope_from_hf(cfg)
    mine = rope_inv_freq(theta, int(cfg.head_dim * partial), scaling)
    assert mine.shape == ref.inv_freq.shape, (mine.shape, ref.inv_freq.shape)
    assert torch.equal(mine, ref.inv_freq)
    assert scaling.attention_factor == ref.attention_scaling
    if case.startswith("yarn"):
        assert scaling.attention_factor > 1.0  # the factor is really exercised


def _tp1_config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                             use_cpu_initialization=True, **kw)


def test_norms_equal_transformers():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P

    from mvlm.models.norm import LayerNorm, RMSNorm, norm_class

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 64, generator=gen)
    w = 0.1 * torch.randn(64, generator=gen)
    b = 0.1 * torch.randn(64, generator=gen)
    cases = [
        (RMSNorm, {"normalization": "RMSNorm"}, LlamaRMSNorm(64, eps=1e-6), 1e-6, False),
        (RMSNorm, {"normalization": "RMSNorm", "layernorm_zero_centered_gamma": True},
         GemmaRMSNorm(64, eps=1e-6), 1e-6, False),
        (LayerNorm, {"normalization": "LayerNorm"}, torch.nn.LayerNorm(64, eps=1e-5), 1e-5, True),
        (LayerNorm, {"normalization": "LayerNorm", "layernorm_zero_centered_gamma": True},
         NemotronLayerNorm1P(64, eps=1e-5), 1e-5, True),
    ]
    for cls, kw, ref, eps, has_bias in cases:
        config = _tp1_config(**kw)
        assert norm_class(config) is cls
        mine = cls(config, 64, eps=eps)
        with torch.no_grad():
            # zero-centred weights start at 0 (scale 1) in both; compare with real values
            mine.weight.copy_(w if kw.get("layernorm_zero_centered_gamma") else 1 + w)
            ref.weight.copy_(mine.weight)
            if has_bias:
                mine.bias.copy_(b)
                ref.bias.copy_(b)
        assert torch.equal(mine(x), ref(x)), type(ref).__name__


def test_unsupported_options_name_the_hf_field():
    import transformers

    from mvlm.models.gpt import ArchError, transformer_config
    from mvlm.models.hf_text import llama_style_arch
    from mvlm.models.rope import RopeConfigError
    from mvlm.runtime.parallel import ParallelLayout

    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                intermediate_size=128, vocab_size=300)
    with pytest.raises(ArchError, match="hidden_act='gelu_new'"):
        arch = llama_style_arch(transformers.LlamaConfig(**base, hidden_act="gelu_new"))
        transformer_config(arch, ParallelLayout(), dtype=torch.float32, device="cpu")
    with pytest.raises(ArchError, match="sliding_window=16"):
        llama_style_arch(transformers.MistralConfig(**base, sliding_window=16))
    with pytest.raises(ArchError, match="use_sliding_window=false"):
        llama_style_arch(transformers.Qwen3Config(**base, use_sliding_window=True,
                                                  sliding_window=16, max_window_layers=0))
    with pytest.raises(RopeConfigError, match="rope_type='dynamic'"):
        llama_style_arch(transformers.LlamaConfig(**base, rope_parameters={
            "rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(RopeConfigError, match="attention_factor"):
        llama_style_arch(transformers.LlamaConfig(**base, max_position_embeddings=8192,
                                                  rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "attention_factor": 1.5,
            "original_max_position_embeddings": 2048}))
    # a window no shorter than the context is a no-op and accepted
    arch = llama_style_arch(transformers.MistralConfig(**base, sliding_window=4096,
                                                       max_position_embeddings=4096))
    assert arch.rope_scaling.rope_type == "default"


def test_te_spec_refuses_untied_biases():
    from mvlm.models.gpt import MvlmTransformerConfig
    from mvlm.models.spec import te_layer_spec

    config = MvlmTransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                                   add_qkv_bias=True, attn_out_bias=True, mlp_bias=False,
                                   use_cpu_initialization=True)
    with pytest.raises(ValueError, match="--transformer_impl local"):
        te_layer_spec(config)


# ---- end to end: test-only families (tests/arch_families.py) ---------------------------------
@pytest.mark.timeout(600)
def test_options_end_to_end_against_transformers(tmp_path):
    from arch_families import NAMES
    from helpers import assert_same_tensors

    spec = tmp_path / "spec.json"
    out = tmp_path / "out.json"
    spec.write_text(json.dumps({"root": str(tmp_path), "out": str(out)}))
    p = subprocess.run([sys.executable, __file__, str(spec)], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    res = json.loads(out.read_text())
    for name in NAMES:
        arch = res[name]["arch"]
        print(f"{name}: max|dlogits| {res[name]['dlogits']:.3e} loss mcore "
              f"{res[name]['loss'][0]:.6f} hf {res[name]['loss'][1]:.6f}; {arch}")
        assert res[name]["dlogits"] <= LOGITS_TOL
        assert abs(res[name]["loss"][0] - res[name]["loss"][1]) <= 1e-6 * max(
            1.0, res[name]["loss"][1])
        n = assert_same_tensors(tmp_path / name / "hf", tmp_path / name / "back")
        assert n > 0
    # the options really were on (the test would pass vacuously on a Llama otherwise)
    sc2, nem = res["starcoder2"]["arch"], res["nemotron"]["arch"]
    assert (sc2["normalization"], sc2["activation"], sc2["gated_mlp"]) == (
        "LayerNorm", "gelu_pytorch_tanh", False)
    assert sc2["qkv_bias"] and sc2["attn_out_bias"] and sc2["mlp_bias"]
    assert (nem["normalization"], nem["norm_zero_centered_gamma"], nem["activation"],
            nem["rotary_percent"]) == ("LayerNorm", True, "relu2", 0.5)
    assert nem["attn_out_bias"] and not nem["mlp_bias"]


def _worker(spec_path: str) -> None:
    import argparse
    import dataclasses
    import logging

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: arch_families
    import arch_families

    from mvlm.convert import verify
    from mvlm.convert.command import add_convert_args, run_convert
    from mvlm.models.registry import get_family

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    root = Path(spec["root"])
    arch_families.register()
    seen: list = []
    orig = verify.verify_against_hf

    def spy(*a, **k):
        r = orig(*a, **k)
        seen.extend(r)
        return r

    verify.verify_against_hf = spy

    def convert(argv: list[str]) -> None:
        p = argparse.ArgumentParser()
        add_convert_args(p)
        run_convert(p.parse_args(argv))

    res = {}
    for name in arch_families.NAMES:
        cfg = arch_families.hf_config(name)
        arch_families.build(name, root / name / "hf")
        seen.clear()
        convert(["--to", "mcore", "--model", str(root / name / "hf"), "--output",
                 str(root / name / "mcore"), "--verify", "--device", "cpu"])
        convert(["--to", "hf", "--model", str(root / name / "mcore"), "--output",
                 str(root / name / "back"), "--device", "cpu"])
        arch = dataclasses.asdict(get_family(cfg.model_type).text_arch(cfg))
        arch = {k: v for k, v in arch.items() if isinstance(v, (bool, int, float, str))}
        res[name] = {"dlogits": max(r.max_abs_logits for r in seen),
                     "loss": [seen[0].loss_mcore, seen[0].loss_hf], "arch": arch}
    Path(spec["out"]).write_text(json.dumps(res))


if __name__ == "__main__":
    _worker(sys.argv[1])
