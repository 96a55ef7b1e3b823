"""LLaVA (CLIP tower + MLP projector + Qwen2 LLM), LLaVA-NeXT and LLaVA-OneVision train the same at
TP2 and PP2 as on one rank.

Through the real trainer (``_train_worker.py``), full fine-tuning of every part (ViT, projector,
LLM) on image rows mixed with text rows, 3 steps: losses and grad norms at TP2 (the tower and
projector replicated per TP rank) and PP2 (the tower on the first stage) equal the one-rank run.
Bars as test_train_parity (relative, floor 1): loss 5e-7, grad norm 1e-5. Measured 2026-12-02
(max over 3 steps): TP2 loss 2.0e-8, grad norm 3.1e-6; PP2 loss 2.3e-8, grad norm 6.6e-8.
"""
from __future__ import annotations

import pytest
from test_train_parity import _launch, _train_lines, common, write_data

pytestmark = [pytest.mark.dist, pytest.mark.timeout(1800)]

STEPS = 3
LOSS_TOL = 5e-7
GNORM_TOL = 1e-5
LAYOUTS = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"]}
# LLaVA-1.5 layout, LLaVA-NeXT (56 px demo images = base + 4 tiles, image_newline) and
# LLaVA-OneVision (SigLIP, anyres_max_2 shrink of the tile grid)
FAMILIES = ("llava", "llava_next", "llava_onevision")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(a))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("llava_train")
    vl_data, _ = write_data(tmp / "data")
    out = {(f, k): tmp / f"{f}_{k}" for f in FAMILIES for k in ("ref", *LAYOUTS)}
    ckpt = {f: tiny_ckpt(f) for f in FAMILIES}
    # one launch per world size, every family's runs in it
    _launch({"runs": [{"name": f"{f}_ref", "argv": common(ckpt[f], vl_data, out[f, "ref"])}
                      for f in FAMILIES]}, 1, tmp, "single")
    _launch({"runs": [{"name": f"{f}_{k}", "argv": common(ckpt[f], vl_data, out[f, k]) + extra}
                      for f in FAMILIES for k, extra in LAYOUTS.items()]}, 2, tmp, "two",
            timeout=1500)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_llava_layout_parity(runs, family, layout):
    a, b = _train_lines(runs[family, "ref"]), _train_lines(runs[family, layout])
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    dl = max(_rel(x["loss"], y["loss"]) for x, y in zip(a, b, strict=True))
    dg = max(_rel(x["grad_norm"], y["grad_norm"]) for x, y in zip(a, b, strict=True))
    print(f"{family} {layout}: max rel |dloss| {dl:.2e}  max rel |dgrad_norm| {dg:.2e}")
    assert dl <= LOSS_TOL, f"{family} {layout}: loss differs by {dl}: {a} vs {b}"
    assert dg <= GNORM_TOL, f"{family} {layout}: grad norm differs by {dg}"
    assert a[-1]["loss"] < a[0]["loss"], a  # it trains, or parity would be vacuous
