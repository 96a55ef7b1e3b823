"""DPO through the Trainer (issue 11), on packed pair rows from a guide-format preference file.

One-rank runs (full training: a frozen copy is the reference; LoRA: the policy with its adapters
off) and two-rank runs at TP2, PP2, CP2 and LoRA at TP2, three steps each on the same 4 pairs:
* step 1 on every layout: reference == policy, so the loss is fp32 ln 2 exactly and
  rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies are exactly 0;
* after an update the reference no longer equals the policy (rewards != 0) and the policy has
  moved towards the chosen answers (margins > 0, loss < ln 2);
* every layout's losses and DPO metrics equal the one-rank run's over the 3 steps (bound
  1e-5 relative, floor 1).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from test_train_parity import common  # noqa: E402

LN2_FP32 = float(torch.tensor(math.log(2.0), dtype=torch.float32))
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected")
LAYOUTS = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "cp2": ["--cp", "2"]}


def _rows(root: Path) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("r.png", "g.png"):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(root / name)
    return [
        {"images": ["r.png"], "messages": [{"role": "user", "content": "<image>Colour?"}],
         "chosen": {"role": "assistant", "content": "Red."},
         "rejected": {"role": "assistant", "content": "Green."}},
        {"messages": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"},
        {"images": ["g.png"], "messages": [{"role": "user", "content": "<image>Colour?"}],
         "chosen": "Green.", "rejected": "Red, surely."},
        {"messages": [{"role": "user", "content": "Capital of France?"}],
         "chosen": "Paris.", "rejected": "Rome."},
    ]


def _launch(runs: list[dict], nproc: int, tmp: Path, name: str) -> dict:
    from helpers import launch_worker

    spec = {"runs": runs, "result": str(tmp / f"{name}.json")}
    f = tmp / f"{name}_spec.json"
    f.write_text(json.dumps(spec))
    launch_worker(HERE / "_dpo_worker.py", nproc, [f], timeout=840, tail=8000)
    return {k: [x for x in v if "loss" in x]
            for k, v in json.loads(Path(spec["result"]).read_text())["logs"].items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("dpo")
    vl = tiny_ckpt("qwen2_vl")
    data = tmp / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(tmp)))

    def run(name: str, extra: list[str], reference: str = "copy") -> dict:
        # all 4 pairs in every step (2 micro-batches of 2 pairs): the steps see the same pairs
        argv = common(vl, data, tmp / name, steps=3) + [
            "--micro_batch_size", "2", "--global_batch_size", "4", "--lr", "5e-3"] + extra
        if reference == "adapters":
            # no adapter dropout: its masks depend on the layout (as in the LoRA parity tests)
            argv += ["--train_type", "lora", "--lora_rank", "4", "--lora_dropout", "0",
                     "--lr", "5e-2"]
        return {"name": name, "argv": argv, "out": str(tmp / name), "reference": reference}

    one = _launch([run("ref", []), run("lora", [], "adapters")], 1, tmp, "one")
    two = _launch([run(k, v) for k, v in LAYOUTS.items()]
                  + [run("lora_tp2", ["--tp", "2"], "adapters")], 2, tmp, "two")
    return one | two


def _close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.parametrize("name", ["ref", "lora", *LAYOUTS, "lora_tp2"])
def test_step0_reference_equals_policy(runs, name):
    logs = runs[name]
    print(name, json.dumps(logs, indent=1))
    assert [x["step"] for x in logs] == [1, 2, 3]
    s0 = logs[0]
    assert s0["loss"] == LN2_FP32, s0["loss"] - LN2_FP32
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert s0[k] == 0.0, (k, s0[k])
    # after an update the reference (frozen copy / adapters off) no longer equals the policy
    assert logs[1]["rewards/chosen"] != 0.0 and logs[1]["rewards/rejected"] != 0.0
    assert logs[-1]["rewards/margins"] > 0 and logs[-1]["loss"] < LN2_FP32


@pytest.mark.parametrize("name,ref", [(k, "ref") for k in LAYOUTS] + [("lora_tp2", "lora")])
def test_layouts_equal_one_rank(runs, name, ref):
    worst = (0.0, "", 0)
    for a, b in zip(runs[name], runs[ref], strict=True):
        for k in METRICS:
            worst = max(worst, (abs(a[k] - b[k]) / max(1.0, abs(b[k])), k, a["step"]))
            assert _close(a[k], b[k]), (name, a["step"], k, a[k], b[k])
    print(f"{name} vs {ref}: max relative difference {worst[0]:.2e} ({worst[1]}, step "
          f"{worst[2]})")
