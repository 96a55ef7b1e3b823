"""Checkpoints move between the Transformer Engine and the local layer specs (issue 9, item 6).

One 2-rank launch (``_ckpt_te_names_worker.py``) writes, per family (Qwen2.5-VL: dense, qkv bias,
vision tower; Qwen3-MoE: MoE, qk-norm), a checkpoint under the local spec, a simulated TE one
(TE key names, ``layer_norm_weight``, fp8 ``_extra_state`` entries) and a format-1 one (key map
off, no format fields), at TP1 x DP2, and loads each at another layout (TP2 / EP2) under the local
spec. Bar: every tensor equal to the model loaded straight from HF (torch.equal, so max |delta|
= 0) and logits bit-identical. Training: a run stopped after its step-2 checkpoint (written by the
legacy writer, or with TE-like norm extra state) and rerun logs exactly what the uninterrupted run
logs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
FAMILIES = ("qwen2_5_vl", "qwen3_moe")
LM = "language_model.decoder.layers."


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_ckpt):
    from helpers import launch_worker
    from test_train_parity import common, write_data

    tmp = tmp_path_factory.mktemp("te_names")
    vl_data, _ = write_data(tmp / "data")
    vl = tiny_ckpt("qwen2_5_vl")

    def run(name: str) -> list[str]:
        return common(vl, vl_data, tmp / "train" / name, steps=4) + ["--save_interval", "2"]

    spec = {"root": str(tmp / "ckpt"), "results": str(tmp / "results.json"),
            "families": {f: str(tiny_ckpt(f)) for f in FAMILIES},
            "train": {n: run(n) for n in ("ref", "legacy", "te_like")}}
    f = tmp / "spec.json"
    f.write_text(json.dumps(spec))
    launch_worker(HERE / "_ckpt_te_names_worker.py", 2, [f], timeout=840)  # < pytest's 900 s
    res = json.loads((tmp / "results.json").read_text())
    res["train_dir"] = str(tmp / "train")
    return res


@pytest.mark.parametrize("family", FAMILIES)
def test_local_spec_writes_te_key_names(results, family):
    facts = results[family]["facts"]["new"]
    keys = set(facts["keys"])
    assert facts["format_version"] == 2 and facts["layer_spec"] == "local"
    assert LM + "self_attention.linear_qkv.layer_norm_weight" in keys
    assert LM + "input_layernorm.weight" not in keys
    if family == "qwen3_moe":  # TE keeps a separate pre-MLP norm in front of the MoE block
        assert LM + "pre_mlp_layernorm.weight" in keys
        assert LM + "mlp.linear_fc1.layer_norm_weight" not in keys
        assert LM + "self_attention.q_layernorm.weight" in keys
    else:
        assert LM + "mlp.linear_fc1.layer_norm_weight" in keys
        assert LM + "pre_mlp_layernorm.weight" not in keys
        assert LM + "self_attention.linear_qkv.bias" in keys
    # The simulated TE checkpoint has the very same tensor keys (it adds _extra_state only).
    te = results[family]["facts"]["te"]
    te_tensors = {k for k in te["keys"] if not k.endswith("_extra_state")}
    assert te_tensors == {k for k in keys if not k.endswith("_extra_state")}
    assert LM + "self_attention.core_attention._extra_state" in te["extra_state"]
    assert "language_model.decoder.final_layernorm._extra_state" in te["extra_state"]
    assert te["layer_spec"] == "te"


@pytest.mark.parametrize("family", FAMILIES)
def test_old_format_checkpoint_really_has_old_names(results, family):
    facts = results[family]["facts"]["old"]
    keys = set(facts["keys"])
    assert facts["format_version"] is None and facts["layer_spec"] is None
    assert LM + "input_layernorm.weight" in keys
    assert LM + "self_attention.linear_qkv.layer_norm_weight" not in keys


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ckpt", ["new", "te", "old", "te_v1"])
def test_loads_under_local_spec_bit_exact(results, family, ckpt):
    r = results[family][f"load_{ckpt}"]
    print(f"{family} {ckpt}: {r['tensors']} tensors, max|dw|={r['max_abs_weight']:.1e}, "
          f"max|dlogits|={r['max_abs_logits']:.1e}")
    assert r["tensors"] > 20
    assert r["unequal"] == [] and r["max_abs_weight"] == 0.0
    assert r["logits_equal"] and r["max_abs_logits"] == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_te_like_model_loads_local_checkpoint(results, family):
    r = results[family]["te_reader"]
    assert r["norms_with_extra_state"] >= 1
    assert r["extra_state_set"] == 0  # the checkpoint had none for them: left unset
    assert r["unequal"] == [] and r["logits_equal"]


@pytest.mark.parametrize("family", FAMILIES)
def test_other_mismatches_still_fail(results, family):
    unused = results[family]["err_unused_tensor"]
    assert "does not use" in unused and "linear_qkv.layer_norm_bias" in unused, unused
    missing = results[family]["err_missing_tensor"]
    assert "lacks" in missing and "final_layernorm.bias" in missing, missing


def _log(d: Path) -> list[dict]:
    from mvlm.train.logging import TIMING_FIELDS

    rows = [json.loads(x) for x in (d / "logging.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


@pytest.mark.parametrize("writer", ["legacy", "te_like"])
def test_resume_from_other_writer_is_bit_exact(results, writer):
    train = Path(results["train_dir"])
    facts = results["train"][f"{writer}_facts"]
    keys = set(facts["keys"])
    if writer == "legacy":
        assert facts["format_version"] is None
        assert LM + "input_layernorm.weight" in keys
        # the optimizer state is keyed by the model keys: old names there too
        assert any(k.endswith("layers.input_layernorm.weight")
                   for k in facts["optimizer_norm_keys"]), facts["optimizer_norm_keys"]
    else:
        assert facts["format_version"] == 2
        assert "language_model.decoder.final_layernorm._extra_state" in facts["extra_state"]
    ref, other = _log(train / "ref"), _log(train / writer)
    assert [r["step"] for r in other if "loss" in r] == [1, 2, 3, 4]
    assert ref == other
    assert (train / writer / "latest").read_text().strip() == "checkpoint-4"
    meta = json.loads((train / writer / "checkpoint-4" / "mvlm_meta.json").read_text())
    assert meta["format_version"] == 2 and meta["layer_spec"] == "local"


def test_newer_format_version_is_refused(tmp_path):
    from mvlm.convert.ckpt_format import FORMAT_VERSION, CheckpointFormatError
    from mvlm.convert.mcore_ckpt import read_meta

    (tmp_path / "mvlm_meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointFormatError, match="upgrade mvlm"):
        read_meta(tmp_path)
    (tmp_path / "mvlm_meta.json").write_text(json.dumps({"format_version": "2"}))
    with pytest.raises(CheckpointFormatError, match="format_version='2'"):
        read_meta(tmp_path)
