"""`python -m mvlm sft ...` with a NaN injected at a known step, for tests/e2e/test_nan_stop.py.

The injection lives here, in the test, not in mvlm: this script patches mvlm in-process and then
runs the real CLI entry point (so exit codes and messages are the user's). Environment:

* ``NAN_KIND`` = ``loss`` (the step's loss sum becomes NaN) or ``grad`` (the gradient of the one
  parameter ``NAN_PARAM`` becomes NaN; the loss stays finite), ``NAN_STEP`` = the 1-based step,
  ``NAN_RANK`` = the only global rank that injects (default: all);
* ``NAN_RECORD`` = a JSON file that receives what the run built and did: the TransformerConfig's
  recompute fields and core_attn_impl, the kernels the attention layers ran, and a checksum of
  ``NAN_PARAM`` after every optimizer call (so a skipped update is visible as an unchanged sum).
"""
from __future__ import annotations

import json
import os
import sys

import torch

STATE = {"done_steps": 0, "record": {"param_sums": []}, "param": None, "bundle": None}
KIND, STEP = os.environ.get("NAN_KIND"), int(os.environ.get("NAN_STEP", "0"))
PARAM = os.environ.get("NAN_PARAM", "language_model.decoder.layers.1.mlp.linear_fc2.weight")


RANK = os.environ.get("NAN_RANK")  # poison only this global rank (default: every rank)


def _poisoned_now() -> bool:
    if RANK is not None and os.environ.get("RANK", "0") != RANK:
        return False
    return STATE["done_steps"] + 1 == STEP


def patch() -> None:
    from mvlm.models import vlm
    from mvlm.train import steps
    from mvlm.train.objectives.sft import SFTObjective

    build_model, forward_step = vlm.build_model, SFTObjective.forward_step
    checked = steps.checked_optimizer_step

    def build_model_spy(*a, **k):
        bundle = build_model(*a, **k)
        STATE["bundle"] = bundle
        p = dict(bundle.models[0].named_parameters()).get(PARAM)
        STATE["param"] = p
        if KIND == "grad" and p is not None:
            p.register_hook(lambda g: g * float("nan") if _poisoned_now() else g)
        return bundle

    def forward_step_spy(self, data_iterator, model):
        out, loss_func = forward_step(self, data_iterator, model)
        if KIND != "loss" or loss_func is None or not _poisoned_now() or not model.training:
            return out, loss_func

        def nan_loss(*a, **k):
            loss_sum, n, report = loss_func(*a, **k)
            loss_sum = loss_sum * float("nan")
            return loss_sum, n, {"lm_loss": torch.stack([loss_sum.detach(), report["lm_loss"][1]])}

        return out, nan_loss

    def checked_spy(*a, **k):
        p = STATE["param"]
        if p is not None and "param_sum_before_step_1" not in STATE["record"]:
            STATE["record"]["param_sum_before_step_1"] = float(p.detach().sum())
        try:
            return checked(*a, **k)
        finally:
            STATE["done_steps"] += 1
            p = STATE["param"]
            STATE["record"]["param_sums"].append(None if p is None else float(p.detach().sum()))
            _write()

    vlm.build_model = build_model_spy
    SFTObjective.forward_step = forward_step_spy
    steps.checked_optimizer_step = checked_spy


def _write() -> None:
    from mvlm.models.attention import SDPACoreAttention

    b = STATE["bundle"]
    if b is None or not os.environ.get("NAN_RECORD"):
        return
    c = b.config
    STATE["record"].update(
        recompute_granularity=c.recompute_granularity, recompute_method=c.recompute_method,
        recompute_num_layers=c.recompute_num_layers, core_attn_impl=c.core_attn_impl,
        param_found=STATE["param"] is not None,
        kernels=sorted({str(m.kernel_used) for mm in b.models for m in mm.modules()
                        if isinstance(m, SDPACoreAttention)}))
    with open(os.environ["NAN_RECORD"], "w") as f:
        json.dump(STATE["record"], f)


if __name__ == "__main__":
    patch()
    from mvlm.cli import main

    sys.exit(main(sys.argv[1:]))
