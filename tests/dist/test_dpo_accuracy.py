"""A tiny multimodal DPO run that learns (issue 11): the demo's colour questions, chosen = the
right colour, rejected = another one, full training of the tiny Qwen2-VL through the Trainer
(one rank). ``rewards/accuracies`` is 0 at step 1 (reference == policy: every reward ties at
exactly 0) and reaches >= 0.9 by the last steps; the exported HF model, run by transformers on
held-out pairs (other images), prefers the chosen answer over the rejected one more than the
starting model does (DPO's implicit reward margin > 0) on >= 7 of 8 pairs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from test_dpo_objective import _launch  # noqa: E402
from test_train_parity import common  # noqa: E402

STEPS = 12


def _pairs(path: Path) -> list[dict]:
    from mvlm.demo_data import COLOURS

    names = sorted(COLOURS)
    out = []
    for r in (json.loads(x) for x in path.read_text().splitlines()):
        right = r["messages"][-1]["content"]
        wrong = names[(names.index(right) + 1) % len(names)]
        out.append({"images": [str((path.parent / p).resolve()) for p in r["images"]],
                    "messages": r["messages"][:-1], "chosen": right, "rejected": wrong})
    return out


def _answer_logps(model_dir: Path, encs: list[dict]) -> torch.Tensor:
    """[pair, (chosen, rejected)] summed answer log-probs from transformers, fp32."""
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = torch.zeros(len(encs), 2, dtype=torch.float64)
    with torch.no_grad():
        for i, e in enumerate(encs):
            for j, pre in enumerate(("", "rejected_")):
                ids, labels = e[f"{pre}input_ids"].long(), e[f"{pre}labels"].long()
                logits = m(input_ids=ids[None], pixel_values=e["pixel_values"],
                           image_grid_thw=e["image_grid_thw"],
                           mm_token_type_ids=(ids == m.config.image_token_id).int()[None]
                           ).logits[0, :-1].float()
                lp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
                out[i, j] = lp[labels[1:] >= 0].double().sum()
    return out


def test_multimodal_dpo_learns_the_colours(tmp_path, tiny_ckpt):
    from mvlm.data.preference import encode_pair
    from mvlm.data.template import TemplateConfig, get_template
    from mvlm.demo_data import write_demo_dataset

    vl = tiny_ckpt("qwen2_vl")
    demo = write_demo_dataset(tmp_path / "demo", n_train=16, n_val=8, image_size=56, seed=5,
                              kinds=("colour",))
    train, val = _pairs(demo.train), _pairs(demo.val)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    out = tmp_path / "run"
    argv = common(vl, data, out, steps=STEPS) + [
        "--micro_batch_size", "4", "--global_batch_size", "8", "--lr", "3e-3",
        "--save_safetensors", "true"]
    logs = _launch([{"name": "acc", "argv": argv, "out": str(out), "reference": "copy"}], 1,
                   tmp_path, "acc")["acc"]
    acc = [x["rewards/accuracies"] for x in logs]
    print("rewards/accuracies by step:", acc)
    print("loss by step:", [round(x["loss"], 4) for x in logs])
    assert acc[0] == 0.0
    assert min(acc[-2:]) >= 0.9, acc
    tpl = get_template(vl, cfg=TemplateConfig(max_length=256, task="preference"))
    encs = [encode_pair(tpl, r) for r in val]
    pol, ref = _answer_logps(out / "hf", encs), _answer_logps(vl, encs)
    margin = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    won = int((margin > 0).sum())
    print(f"held-out implicit reward margins: {margin.tolist()}; chosen preferred on "
          f"{won}/{len(val)}")
    assert won >= 7, margin
