"""Qwen2.5-Omni thinker (audio encoder + ViT + Qwen2 LLM) converts exactly and trains the same
at TP2 and PP2 as on one rank; its LoRA adapters load in peft.

Two launches: one rank (the reference SFT run) and four ranks (``_internvl_worker.py``, the
generic convert-then-train worker: every conversion, then the TP2 / PP2 SFT runs and a TP2 LoRA
run, each with DP2 filling the four ranks), plus one ``mvlm export``.

* Round trip: the tiny thinker is loaded from HF at TP2 x PP2, checked against transformers on
  text, one image, two images of different sizes, one audio and audio + image (verify's inputs
  for a family that takes audio; transformers computes its own mRoPE there), saved as
  torch_dist, re-loaded at TP2, PP2 and TP1 (resharding) and exported at all four layouts. Every
  export equals the original tensor by tensor (torch.equal, same keys). Bars: logits 5e-6
  absolute, loss 1e-6 relative (as test_convert_roundtrip).
* SFT parity: full fine-tuning of both encoders, aligners and the LLM on rows with audio, audio +
  image, image and text (_omni_data.py), 3 steps: losses within 1e-6 relative of one rank, grad
  norms within 1e-5.
* LoRA at TP2 (all-linear; encoders frozen, ms-swift's default): peft loads ``run/adapter`` onto
  ``Qwen2_5OmniThinkerForConditionalGeneration`` with the merged export's logits on an audio +
  image prompt (bound 1e-5), and the adapters moved the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _omni_data import write_omni_rows
from helpers import (
    assert_same_tensors,
    assert_sft_parity,
    assert_verify_checks,
    launch_worker,
    peft_vs_merged,
)
from test_internvl_layouts import (  # the same bars and training layouts as InternVL
    GNORM_TOL,
    LAYOUTS,
    LOGITS_TOL,
    LORA_TOL,
    LOSS_TOL,
    _lora_argv,
)
from test_train_parity import _launch, _train_lines, common

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
CONVERT = [{"name": "tp2pp2", "tp": 2, "pp": 2}, {"name": "tp2", "tp": 2},
           {"name": "pp2", "pp": 2}, {"name": "tp1"}]
CHECKS = ("text", "image+text", "two-images", "audio+text", "audio+image")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("omni")
    ckpt = tiny_ckpt("qwen2_5_omni")
    data = write_omni_rows(tmp / "data")
    out = {k: tmp / k for k in ("ref", "lora", *LAYOUTS)}
    _launch({"runs": [{"name": "ref", "argv": common(ckpt, data, out["ref"])}]}, 1, tmp,
            "omni_single")
    lora = _lora_argv(ckpt, data, out["lora"])
    spec = {"out": str(tmp), "convert": [{"name": "omni", "hf": str(ckpt), "layouts": CONVERT}],
            "runs": [{"name": k, "argv": common(ckpt, data, out[k]) + extra}
                     for k, extra in LAYOUTS.items()] + [{"name": "lora", "argv": lora}]}
    (tmp / "spec.json").write_text(json.dumps(spec))
    p = launch_worker(HERE / "_internvl_worker.py", 4, [tmp / "spec.json"], timeout=1500)
    print("\n".join(x for x in p.stdout.splitlines() if x.startswith(("RUN", "CONVERT"))))
    return {"tmp": tmp, "ckpt": ckpt, "out": out, "data": data,
            "verify": json.loads((tmp / "verify.json").read_text())}


def test_omni_roundtrip_exact(runs):
    checks = runs["verify"]
    assert {(r["case"], r["check"]) for r in checks} == {
        (f"omni_{lay['name']}", c) for lay in CONVERT for c in CHECKS}
    assert_verify_checks(checks, LOGITS_TOL, LOSS_TOL)
    for lay in CONVERT:
        n = assert_same_tensors(runs["ckpt"], runs["tmp"] / f"omni_{lay['name']}")
        print(f"  omni exported at {lay['name']}: {n} tensors bit-identical")
    names = __import__("helpers").load_all_safetensors(runs["ckpt"])
    assert any(k.startswith("audio_tower.") for k in names)
    assert any(k.startswith("visual.") for k in names)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_omni_sft_layout_parity(runs, layout):
    assert_sft_parity(_train_lines(runs["out"]["ref"]), _train_lines(runs["out"][layout]),
                      f"omni {layout}", 3, LOSS_TOL, GNORM_TOL)


@pytest.mark.timeout(1200)
def test_omni_lora_peft_equals_merged(runs):
    import transformers

    from mvlm.data.template import get_template

    base, run = runs["ckpt"], runs["out"]["lora"]

    def load(path):
        return transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32).eval()

    rows = [json.loads(x) for x in runs["data"].read_text().splitlines()]
    row = next(r for r in rows if r.get("audios") and r.get("images"))
    enc = get_template(base).encode(row)
    inputs = {k: enc[k] for k in ("input_features", "feature_attention_mask", "pixel_values",
                                  "image_grid_thw")}
    ids = enc["input_ids"][None]
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    d, moved, names = peft_vs_merged(load, base, run, runs["tmp"] / "lora_merged", inputs)
    assert any("language_model" in n for n in names)
    print(f"omni LoRA TP2: peft vs merged max|dlogits| {d:.2e}; trained vs base {moved:.2e}")
    assert d <= LORA_TOL
    assert moved > 1e-2
