"""HF -> Megatron-Core (sharded) -> HF through the `mvlm convert` CLI under torchrun (gloo, CPU,
fp32), every family and layout in ONE four-rank launch (_convert_roundtrip_worker.py).

Each case converts the tiny HF checkpoint into a torch_dist checkpoint at one layout, then
exports that checkpoint back to HF at other layouts (resharding on load): dense families at all
of TP1, TP2, PP2 and TP2 x PP2, MoE families at EP2, TP1 and PP2. Conversions into Megatron and
exports at a layout not yet checked for the case run `--verify`: logits of the sharded model
against the HF model on text-only, one-image and two-image inputs (VL families), max |dlogits| <=
LOGITS_TOL and |dloss| <= LOSS_TOL (relative, see below). Every export is compared tensor by
tensor with the original checkpoint (torch.equal, same key set, dtypes and shapes); a one-ulp
change of LLaVA-NeXT's image_newline in the export fails it (checked once by hand, 2026-12-02),
while the logits check alone passes. With four ranks a TP2 or PP2 layout also has two
data-parallel replicas, TP1 has four.

Why one launch: importing torch / Megatron-Core / transformers and starting the process group
were most of this file's CPU time when every conversion was its own torchrun (469 CPU-s for 13
launches' worth of cases); the worker calls the CLI's entry point in-process, step after step.
`-k NAME` runs only the selected cases' conversions.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import assert_same_tensors, launch_worker, load_all_safetensors

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_convert_roundtrip_worker.py"

# fp32 CPU bars, tighter than `--verify`'s default --verify_tol (1e-4, kept loose for bf16 users):
# measured maxima 2026-12-02 over all cases below: max |dlogits| 6.0e-7 (Qwen3 at TP2 and
# TP2 x PP2, LLaVA-NeXT at PP2 and OneVision at TP2 on one image; Qwen2.5-VL at TP2 x PP2 5.4e-7,
# Llama 4.8e-7, LLaVA 4.8e-7 on two images, LLaVA with a Llama LLM 5.4e-7);
# |dloss| 1e-6 as printed (6 decimals) on a loss of 6.9, i.e. 1.5e-7 relative
LOGITS_TOL = 5e-6  # absolute on logits
LOSS_TOL = 1e-6  # relative to the loss with a floor of 1: |dloss| <= LOSS_TOL * max(1, |loss|)

VERIFY_RX = re.compile(r"verify (\S+)\s+max\|dlogits\| = (\S+)\s+loss mcore (\S+) hf (\S+)")


def _check_verify_output(stdout: str, expect: set[str]) -> None:
    found = {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(4)))
             for m in VERIFY_RX.finditer(stdout)}
    assert set(found) == expect, stdout[-3000:]
    for name, (d, lm, lh) in found.items():
        print(f"  {name}: max|dlogits|={d:.3e} loss mcore={lm:.6f} hf={lh:.6f}")
        assert d <= LOGITS_TOL, (name, d)
        assert abs(lm - lh) <= LOSS_TOL * max(1.0, abs(lh)), (name, lm, lh)


VL_CHECKS = {"text", "image+text", "two-images"}

TP1: list[str] = []
TP2 = ["--tp", "2"]
PP2 = ["--pp", "2"]
TP2PP2 = ["--tp", "2", "--pp", "2"]
EP2 = ["--ep", "2"]


def _key(layout: list[str]) -> str:
    return " ".join(layout) or "TP1"


# case -> (tiny_ckpt arguments, layout saved at, [layouts exported at]); the saved layout and
# every export at a layout new to the case run --verify.
CASES: dict[str, tuple[dict, list[str], list[list[str]]]] = {
    # dense families: saved at one layout, exported at the three others (TP1, TP2, PP2, TP2 x PP2)
    "qwen2_5_vl": ({"family": "qwen2_5_vl"}, TP2PP2, [TP1, TP2, PP2]),
    "qwen2_vl": ({"family": "qwen2_vl"}, TP2, [PP2, TP1, TP2PP2]),
    "qwen2": ({"family": "qwen2"}, PP2, [TP1, TP2, TP2PP2]),  # tied across pipeline stages
    # MoE: saved at EP2, exported at TP1 and PP2
    "qwen3_moe": ({"family": "qwen3_moe"}, EP2, [TP1, PP2]),
    # Llama: llama3 RoPE scaling, untied; Qwen3: q/k-norm, tied across pipeline stages
    "llama": ({"family": "llama"}, TP2, [TP1, PP2, TP2PP2]),
    "qwen3": ({"family": "qwen3"}, PP2, [TP2, TP1, TP2PP2]),
    # LLaVA: CLIP tower + MLP projector, Qwen2 LLM under language_model.
    "llava": ({"family": "llava"}, TP2, [TP1, PP2, TP2PP2]),
    # LLaVA-1.5's shape: a Llama LLM (no QKV bias, its own weight table) under language_model.
    "llava_llama": ({"family": "llava", "text_model_type": "llama"}, TP2, [TP1]),
    # LLaVA-NeXT / OneVision: any-resolution tiles (rows + (tiles,1,1) grid), image_newline
    "llava_next": ({"family": "llava_next"}, TP2PP2, [TP1, TP2, PP2]),
    "llava_onevision": ({"family": "llava_onevision"}, TP2PP2, [TP1, TP2, PP2]),
    # Qwen3-VL: DeepStack levels on decoder layers 0-1 (the first stage at PP2), interleaved mRoPE
    "qwen3_vl": ({"family": "qwen3_vl"}, TP2PP2, [TP1, TP2, PP2]),
    # Qwen3-VL-MoE: experts fused in the checkpoint ([E, hidden, 2I] / [E, I, hidden]), sliced per
    # expert on load at EP2, re-fused on export (across shards: tests/unit/test_qwen3_vl_moe.py)
    "qwen3_vl_moe": ({"family": "qwen3_vl_moe"}, EP2, [TP1, PP2]),
}
# Exports that skip --verify although their layout is new to the case: what they would prove
# is proved elsewhere in this file (llava_llama at TP1: the Llama LLM's TP1 logits are the
# llama case's, the LLaVA wrapping at TP1 is the llava case's).
NO_VERIFY = {("llava_llama", "TP1")}


def _family(name: str) -> str:
    return CASES[name][0]["family"]


def _is_vlm(family: str) -> bool:
    from mvlm.models.registry import get_family

    return get_family(family).is_vlm


@pytest.fixture(scope="module")
def launch(request, tiny_ckpt, tmp_path_factory):
    """Build the tiny checkpoints of the selected cases (``-k``) and run all their steps in one
    4-rank launch; -> (checkpoints, step records, step specs, output root)."""
    here = Path(request.node.path)
    selected = {it.callspec.params["name"] for it in request.session.items
                if Path(it.path) == here and hasattr(it, "callspec")}
    out = tmp_path_factory.mktemp("roundtrip")
    ckpts, cases = {}, []
    for name, (args, saved, exports) in CASES.items():
        if name not in selected:
            continue
        args = dict(args)
        ckpts[name] = tiny_ckpt(args.pop("family"), **args)
        seen = {_key(saved)}
        steps = [{"to": "mcore", "layout": saved, "verify": True}]
        for lay in exports:
            new = _key(lay) not in seen and (name, _key(lay)) not in NO_VERIFY
            seen.add(_key(lay))
            steps.append({"to": "hf", "layout": lay, "verify": new})
        cases.append({"name": name, "hf": str(ckpts[name]), "steps": steps})
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "cases": cases}))
    p = launch_worker(WORKER, 4, [spec], timeout=1800)
    print(p.stdout[-4000:])
    steps: dict[str, list[dict]] = {}
    for rec in json.loads((out / "steps.json").read_text()):
        steps.setdefault(rec["case"], []).append(rec)
    for recs in steps.values():  # the worker runs the steps grouped by layout
        recs.sort(key=lambda r: r["step"])
    spec_steps = {c["name"]: c["steps"] for c in cases}
    return ckpts, steps, spec_steps, out


@pytest.mark.parametrize("name", list(CASES))
def test_roundtrip(launch, name):
    ckpts, steps, spec_steps, out = launch
    hf, family = ckpts[name], _family(name)
    expect = VL_CHECKS if _is_vlm(family) else {"text"}
    assert len(steps[name]) == len(spec_steps[name]) == 1 + len(CASES[name][2])
    for rec, step in zip(steps[name], spec_steps[name], strict=True):
        print(f"{name} --to {rec['to']} at {_key(rec['layout'])}")
        _check_verify_output(rec["stdout"], expect if step["verify"] else set())
        assert "mvlm convert: wrote" in rec["stdout"], rec["stdout"][-2000:]
        dst = Path(rec["output"])
        if rec["to"] == "mcore":
            assert (dst / "mvlm_meta.json").exists() and (dst / "hf" / "config.json").exists()
            continue
        count = assert_same_tensors(hf, dst)
        print(f"  {count} tensors bit-identical to the original")
        names = set(load_all_safetensors(dst))
        if name in ("qwen2", "qwen3"):  # tied: no duplicated lm_head
            assert "lm_head.weight" not in names
        for f in ("tokenizer.json", "tokenizer_config.json", "config.json",
                  "generation_config.json"):
            assert (dst / f).exists(), f
        if _is_vlm(family):
            assert (dst / "preprocessor_config.json").exists() or \
                (dst / "processor_config.json").exists()
    if name == "llava_llama":
        cfg = json.loads((hf / "config.json").read_text())
        assert cfg["text_config"]["model_type"] == "llama"
    assert not [q for q in (out / name).iterdir() if q.name.startswith(".")], "staging left"
