"""InternVL (InternViT + pixel-shuffle projector + Qwen2 / Qwen3 LLM) converts exactly and trains
the same at TP2 and PP2 as on one rank; its LoRA adapters load in peft.

Two launches: one rank (the reference SFT run) and two ranks (_internvl_worker.py: every
conversion, then the TP2 / PP2 SFT runs and a TP2 LoRA run), plus one `mvlm export`.

* Round trip: the Qwen2 checkpoint (InternVL 2.5 / 3, untied) is loaded at TP2, checked against
  transformers on text, one image (7 tiles) and two images of different sizes (1 and 7 tiles),
  saved as torch_dist, re-loaded at PP2 and at TP1 (resharding) and exported at all three; the
  Qwen3 checkpoint (InternVL 3.5) with tied embeddings at PP2 and TP2 likewise. Every export
  equals the original tensor by tensor (torch.equal, same keys). Bars: logits 5e-6 absolute,
  loss 1e-6 relative (as test_convert_roundtrip).
* SFT parity: full fine-tuning of ViT, projector and LLM on image rows of 1, 7 and 7 tiles mixed
  with text rows, 3 steps: losses within 1e-6 relative of one rank, grad norms within 1e-5.
* LoRA at TP2 (all-linear, ViT frozen as ms-swift's default): peft loads ``run/adapter`` onto
  ``InternVLForConditionalGeneration`` with the merged export's logits on a 7-tile image prompt
  (bound 1e-5), and the adapters moved the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_same_tensors,
    assert_sft_parity,
    assert_verify_checks,
    launch_worker,
    peft_vs_merged,
)
from test_train_parity import _launch, _train_lines, common, write_data

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
LOGITS_TOL = 5e-6
LOSS_TOL = 1e-6
GNORM_TOL = 1e-5
LORA_TOL = 1e-5
LAYOUTS = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"]}
CONVERT = {"qwen2": [{"name": "tp2", "tp": 2}, {"name": "pp2", "pp": 2}, {"name": "tp1"}],
           "qwen3_tied": [{"name": "pp2", "pp": 2}, {"name": "tp2", "tp": 2}]}


def _tiled_data(root: Path) -> Path:
    """test_train_parity's rows, with two images replaced by larger ones of other aspect ratios
    (84 x 56 and 112 x 84 px: 6 tiles + thumbnail each, against 1 tile for 56 x 56)."""
    from PIL import Image

    vl, _ = write_data(root)
    rows = [json.loads(x) for x in vl.read_text().splitlines()]
    with_img = [r for r in rows if r.get("images")]
    for r, size in zip(with_img[:2], ((84, 56), (112, 84)), strict=True):
        src = Path(r["images"][0])
        dst = src.with_name(f"{src.stem}_{size[0]}x{size[1]}.png")
        Image.open(src).convert("RGB").resize(size).save(dst)
        r["images"] = [str(dst)]
    out = root / "tiled.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _lora_argv(ckpt: Path, data: Path, out: Path) -> list[str]:
    return ["--model", str(ckpt), "--dataset", str(data), "--train_type", "lora",
            "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0",
            "--target_modules", "all-linear", "--torch_dtype", "float32", "--train_iters", "2",
            "--micro_batch_size", "1", "--global_batch_size", "2", "--lr", "5e-2",
            "--max_length", "256", "--seed", "0", "--output_dir", str(out), "--tp", "2",
            "--report_to", "none", "--disable_tqdm", "true", "--save_safetensors", "true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("internvl")
    ckpts = {"qwen2": tiny_ckpt("internvl"),
             "qwen3_tied": tiny_ckpt("internvl", text_model_type="qwen3",
                                     tie_word_embeddings=True)}
    data = _tiled_data(tmp / "data")
    out = {k: tmp / k for k in ("ref", "lora", *LAYOUTS)}
    _launch({"runs": [{"name": "ref", "argv": common(ckpts["qwen2"], data, out["ref"])}]}, 1,
            tmp, "single")
    spec = {"out": str(tmp), "convert": [{"name": k, "hf": str(ckpts[k]), "layouts": lay}
                                         for k, lay in CONVERT.items()],
            "runs": [{"name": k, "argv": common(ckpts["qwen2"], data, out[k]) + extra}
                     for k, extra in LAYOUTS.items()]
            + [{"name": "lora", "argv": _lora_argv(ckpts["qwen2"], data, out["lora"])}]}
    (tmp / "spec.json").write_text(json.dumps(spec))
    p = launch_worker(HERE / "_internvl_worker.py", 2, [tmp / "spec.json"], timeout=1500)
    print("\n".join(x for x in p.stdout.splitlines() if x.startswith(("RUN", "CONVERT"))))
    return {"tmp": tmp, "ckpts": ckpts, "out": out, "data": data,
            "verify": json.loads((tmp / "verify.json").read_text())}


@pytest.mark.parametrize("name", list(CONVERT))
def test_internvl_roundtrip_exact(runs, name):
    checks = [r for r in runs["verify"] if r["case"].startswith(name + "_")]
    assert {(r["case"], r["check"]) for r in checks} == {
        (f"{name}_{lay['name']}", c) for lay in CONVERT[name]
        for c in ("text", "image+text", "two-images")}
    assert_verify_checks(checks, LOGITS_TOL, LOSS_TOL)
    hf = runs["ckpts"][name]
    for lay in CONVERT[name]:
        n = assert_same_tensors(hf, runs["tmp"] / f"{name}_{lay['name']}")
        print(f"  {name} exported at {lay['name']}: {n} tensors bit-identical")
    names = __import__("helpers").load_all_safetensors(hf)
    assert any(k.startswith("vision_tower.") for k in names)
    assert ("language_model.lm_head.weight" in names) == (name == "qwen2")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_internvl_sft_layout_parity(runs, layout):
    assert_sft_parity(_train_lines(runs["out"]["ref"]), _train_lines(runs["out"][layout]),
                      f"internvl {layout}", 3, LOSS_TOL, GNORM_TOL)


@pytest.mark.timeout(1200)
def test_internvl_lora_peft_equals_merged(runs):
    import transformers

    from mvlm.data.template import get_template

    base, run = runs["ckpts"]["qwen2"], runs["out"]["lora"]

    def load(path):
        return transformers.InternVLForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32).eval()

    rows = [json.loads(x) for x in runs["data"].read_text().splitlines()]
    row = [r for r in rows if r.get("images")][1]  # the 112 x 84 image: 7 tiles
    enc = get_template(base).encode(row)
    assert enc["pixel_values"].shape[0] == 7
    inputs = {"input_ids": enc["input_ids"][None], "pixel_values": enc["pixel_values"]}
    d, moved, names = peft_vs_merged(load, base, run, runs["tmp"] / "lora_merged", inputs)
    assert any("language_model" in n for n in names)
    print(f"internvl LoRA TP2: peft vs merged max|dlogits| {d:.2e}; trained vs base {moved:.2e}")
    assert d <= LORA_TOL
    assert moved > 1e-2
