"""Llama 3, Qwen3 dense, Mistral and Gemma: exact against transformers, fp32, one rank.

Per family, on tiny random checkpoints built from configs (``mvlm.models.<name>.tiny``):

* ``mvlm convert --to mcore --verify`` (logits and loss against the transformers model) and back
  ``--to hf``: every tensor bit-identical to the original; cases cover tied and untied embeddings,
  Llama 3.1's ``llama3`` RoPE scaling (the tiny default), Llama with ``attention_bias`` but no
  ``mlp_bias`` (o_proj bias, bias-free MLP), Qwen3 with YaRN, Mistral (no sliding window) and
  Gemma (zero-centred RMSNorm, GeGLU, embeddings scaled by sqrt(hidden), tied);
* the native chat template renders exactly what the checkpoint's HF chat template renders
  (system prompt, multi-turn), with loss on the assistant turns only.
TP/PP layouts of the same families: tests/dist/test_convert_roundtrip.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Measured 2026-12-02 (fp32, TP1, CPU): max |dlogits| 0.0 in every case below.
LOGITS_TOL = 1e-6

CASES = {
    "llama": ("llama", {}),
    "llama_tied_attn_bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
    "qwen3": ("qwen3", {}),
    "qwen3_untied_yarn": ("qwen3", {"tie_word_embeddings": False, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0,
        "original_max_position_embeddings": 1024}}),
    "mistral": ("mistral", {}),
    "gemma": ("gemma", {}),
}


def _build(tmp_path: Path, name: str) -> Path:
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    family, overrides = CASES[name]
    return build_tiny_checkpoint(family, tmp_path / name / "hf", **overrides)


@pytest.mark.timeout(900)
def test_convert_roundtrip_and_logits(tmp_path):
    from helpers import assert_same_tensors, load_all_safetensors

    cases = []
    for name in CASES:
        hf = _build(tmp_path, name)
        cases.append({"name": name, "src": str(hf), "mcore": str(tmp_path / name / "mcore"),
                      "back": str(tmp_path / name / "back")})
    spec = tmp_path / "spec.json"
    out = tmp_path / "out.json"
    spec.write_text(json.dumps({"cases": cases, "out": str(out)}))
    p = subprocess.run([sys.executable, __file__, str(spec)], capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-8000:]
    res = json.loads(out.read_text())
    for c in cases:
        r = res[c["name"]]
        print(f"{c['name']}: max|dlogits| {r['dlogits']:.3e} loss mcore {r['loss'][0]:.6f} "
              f"hf {r['loss'][1]:.6f}; rope {r['rope']}, biases {r['biases']}")
        assert r["dlogits"] <= LOGITS_TOL
        assert abs(r["loss"][0] - r["loss"][1]) <= 1e-6 * max(1.0, r["loss"][1])
        n = assert_same_tensors(Path(c["src"]), Path(c["back"]))
        names = set(load_all_safetensors(Path(c["back"])))
        tied = c["name"] in ("llama_tied_attn_bias", "qwen3", "gemma")
        assert ("lm_head.weight" in names) is not tied
        print(f"  {n} tensors bit-identical")
    # the cases really exercise what they are named for
    assert res["llama"]["rope"] == "llama3" and res["qwen3_untied_yarn"]["rope"] == "yarn"
    assert res["llama_tied_attn_bias"]["biases"] == [True, True, False]
    assert res["qwen3"]["biases"] == [False, False, False] and res["qwen3"]["qk_norm"]
    assert res["gemma"]["gemma"] == ["gelu_pytorch_tanh", True, True, 128 ** 0.5]


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma"])
def test_native_template_equals_hf_chat_template(family, tiny_ckpt):
    from transformers import AutoTokenizer

    from mvlm.data.template import get_template

    ckpt = tiny_ckpt(family)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tpl = get_template(ckpt)
    assert tpl.backend == "native" and tpl.family == family
    conversations = [
        [{"role": "user", "content": "What is two plus two?"},
         {"role": "assistant", "content": "four"}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
    ]
    for msgs in conversations:
        text, spans = tpl.render_native(msgs)
        assert text == tok.apply_chat_template(msgs, tokenize=False)
        lead = " " if family == "mistral" else ""  # "[/INST] answer": the space opens it
        answers = [lead + m["content"] for m in msgs if m["role"] == "assistant"]
        assert [text[s:e] for s, e in spans] == [a + tok.eos_token for a in answers]
        enc = tpl.encode({"messages": msgs})
        ids, labels = enc["input_ids"], enc["labels"]
        assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
        trained = tok.decode(ids[labels != -100].tolist()) if labels.ndim == 1 else None
        assert trained == "".join(a + tok.eos_token for a in answers)
    prompt = [{"role": "user", "content": "Hi"}]
    rl = type(tpl)(tok, cfg=type(tpl.cfg)(task="rl"))
    assert rl.render(prompt)[0] == tok.apply_chat_template(prompt, tokenize=False,
                                                           add_generation_prompt=True)


def _worker(spec_path: str) -> None:
    """One process for all conversions (import megatron once): convert, verify, export back."""
    import argparse
    import logging

    import transformers

    from mvlm.convert import verify
    from mvlm.convert.command import ConvertConfig, add_convert_args, run_convert
    from mvlm.models.registry import get_family

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
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
        run_convert(ConvertConfig.from_flags(vars(p.parse_args(argv))))

    res = {}
    for c in spec["cases"]:
        seen.clear()
        convert(["--to", "mcore", "--model", c["src"], "--output", c["mcore"], "--verify",
                 "--device", "cpu"])
        convert(["--to", "hf", "--model", c["mcore"], "--output", c["back"], "--device", "cpu"])
        cfg = transformers.AutoConfig.from_pretrained(c["src"])
        arch = get_family(cfg.model_type).text_arch(cfg)
        res[c["name"]] = {"dlogits": max(r.max_abs_logits for r in seen),
                          "loss": [seen[0].loss_mcore, seen[0].loss_hf],
                          "rope": arch.rope_scaling.rope_type, "qk_norm": arch.qk_layernorm,
                          "biases": [arch.qkv_bias, arch.attn_out_bias, arch.mlp_bias],
                          "gemma": [arch.activation, arch.gated_mlp,
                                    arch.norm_zero_centered_gamma, arch.embedding_multiplier]}
    Path(spec["out"]).write_text(json.dumps(res))


if __name__ == "__main__":
    _worker(sys.argv[1])
