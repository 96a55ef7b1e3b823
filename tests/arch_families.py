"""Test-only families for the TextArch options: HF architectures no mvlm family uses, registered
with nothing but a ``TextArch`` reader and a weight table, so that the generic decoder options are
checked end to end against transformers (tests/unit/test_text_arch_options.py, one rank, and
tests/dist/test_text_arch_options_tp.py, TP2 / PP2).

* StarCoder2: LayerNorm with biases, ungated ``gelu_pytorch_tanh`` MLP ``c_fc``/``c_proj``,
  biases on every linear (Megatron-Core's ``add_bias_linear``), tied embeddings;
* Nemotron: LayerNorm1P (zero-centred), ungated ``relu2``, ``partial_rotary_factor`` 0.5,
  ``attention_bias`` without ``mlp_bias`` (o_proj bias, bias-free MLP), untied.
Import this module with the tests directory on ``sys.path``; the weight tables are referenced
as ``arch_families:<name>_weights``.
"""
from __future__ import annotations

from pathlib import Path

NAMES = ("starcoder2", "nemotron")
_COMMON = dict(vocab_size=1000, hidden_size=128, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=256, num_hidden_layers=2, max_position_embeddings=512)


def hf_config(name: str):
    import transformers

    if name == "starcoder2":
        return transformers.Starcoder2Config(**_COMMON, sliding_window=None,
                                             hidden_act="gelu_pytorch_tanh", use_bias=True)
    return transformers.NemotronConfig(**_COMMON, partial_rotary_factor=0.5, hidden_act="relu2",
                                       attention_bias=True, mlp_bias=False,
                                       tie_word_embeddings=False)


def build(name: str, out: Path) -> Path:
    """A random-weight checkpoint (norm scales 1 + 0.1 randn, random biases) at ``out``."""
    import transformers

    from mvlm.testing.tiny_models import _randomize_

    model = transformers.AutoModelForCausalLM.from_config(hf_config(name)).float()
    _randomize_(model, 0)
    model.save_pretrained(out)
    return out


def starcoder2_weights(hf_config, arch):
    from mvlm.models.decoder_table import HFNames, decoder_table

    return decoder_table(arch, names=HFNames(up="mlp.c_fc", down="mlp.c_proj"))


def nemotron_weights(hf_config, arch):
    from mvlm.models.decoder_table import decoder_table

    return decoder_table(arch)


def _starcoder2_arch(c):
    from mvlm.models.hf_text import llama_style_arch

    return llama_style_arch(c, normalization="LayerNorm", norm_eps_field="norm_epsilon",
                            gated_mlp=False, qkv_bias=c.use_bias, attn_out_bias=c.use_bias,
                            mlp_bias=c.use_bias)


def _nemotron_arch(c):
    from mvlm.models.hf_text import llama_style_arch

    return llama_style_arch(c, normalization="LayerNorm", norm_eps_field="norm_eps",
                            norm_zero_centered_gamma=True, gated_mlp=False, partial_rotary=True)


def register() -> None:
    """Register both in this process (convert reads the registry by model_type)."""
    from mvlm.models.registry import FamilySpec, register

    # template / tiny are never asked for by convert; they point at an existing family's parts
    for name, arch, cls in (("starcoder2", _starcoder2_arch, "Starcoder2ForCausalLM"),
                            ("nemotron", _nemotron_arch, "NemotronForCausalLM")):
        register(FamilySpec(name=f"test_{name}", model_types=(name,), hf_model_class=cls,
                            text_arch=arch, weights=f"arch_families:{name}_weights",
                            template="mvlm.models.qwen2.template:Qwen2Template",
                            tiny="mvlm.models.qwen2.tiny:TINY"))
