"""Reward model (``mvlm rlhf --rlhf_type rm``, issue 11): value head + Bradley-Terry on the
Trainer, exported in layouts transformers loads.

One launch, one rank, two runs of 3 steps on the same preference pairs, each evaluated on one
held-out pair after the last step (the final eval: the exported weights):
* ``vl``: the tiny Qwen2-VL (image pairs). transformers has no sequence-classification class
  for it, so the head is ``value_head.safetensors`` beside the HF model;
  :func:`mvlm.rl.reward_model.load_reward_model` scores the held-out pair's chosen and rejected
  sequences (same token ids and pixels as mvlm's) -- equal to the final eval's
  ``eval_rewards/chosen`` / ``eval_rewards/rejected`` (one pair: those are its two rewards);
* ``txt``: the tiny Qwen2 (text), with ``--center_rewards_coefficient 0.01``: exported as
  ``Qwen2ForSequenceClassification`` (``score.weight``, no ``lm_head``), loaded by
  ``AutoModelForSequenceClassification``; its ``logits[:, 0]`` equal the eval rewards.
Both: the margin widens over the 3 steps and accuracy ends at 1 on the training pairs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from test_dpo_objective import _launch, _rows  # noqa: E402
from test_train_parity import common  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("rm")
    rows = _rows(tmp)
    train, val = tmp / "train.jsonl", tmp / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val.write_text(json.dumps(rows[2]) + "\n")  # an image pair
    txt_rows = [r for r in rows if "images" not in r]
    txt_train, txt_val = tmp / "txt.jsonl", tmp / "txt_val.jsonl"
    txt_train.write_text("".join(json.dumps(r) + "\n" for r in txt_rows))
    txt_val.write_text(json.dumps(txt_rows[0]) + "\n")
    models = {"vl": tiny_ckpt("qwen2_vl"), "txt": tiny_ckpt("qwen2")}

    def run(name: str, data: Path, vdata: Path, gbs: int, extra: dict) -> dict:
        argv = common(models[name], data, tmp / name, steps=3) + [
            "--micro_batch_size", "1", "--global_batch_size", str(gbs), "--lr", "5e-3",
            "--val_dataset", str(vdata), "--eval_interval", "2", "--save_safetensors", "true"]
        return {"name": name, "argv": argv, "out": str(tmp / name), "objective": "rm"} | extra

    logs = _launch([run("vl", train, val, 4, {}),
                    run("txt", txt_train, txt_val, 2, {"center_rewards_coefficient": 0.01})],
                   1, tmp, "rm")
    return {"tmp": tmp, "models": models, "val": {"vl": rows[2], "txt": txt_rows[0]},
            "logs": logs}


def _final_eval(tmp: Path, name: str) -> dict:
    lines = [json.loads(x) for x in (tmp / name / "logging.jsonl").read_text().splitlines()]
    return [x for x in lines if "eval_loss" in x][-1]


def _encoded_pair(name: str, runs: dict) -> dict:
    from mvlm.data.preference import encode_pair
    from mvlm.data.template import TemplateConfig, get_template

    tpl = get_template(runs["models"][name], cfg=TemplateConfig(max_length=256,
                                                                task="preference"))
    return encode_pair(tpl, runs["val"][name], str(runs["tmp"]))


@pytest.mark.parametrize("name", ["vl", "txt"])
def test_rm_trains(runs, name):
    logs = runs["logs"][name]
    print(name, json.dumps(logs, indent=1))
    assert [x["step"] for x in logs] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in logs)
    # the pairs are learnt: the margin widens and every pair ends ranked right (the txt run's
    # loss includes the centring term, which grows as its rewards drift together)
    assert logs[-1]["margin"] > logs[0]["margin"]
    assert logs[-1]["accuracy"] == 1.0
    for k in ("margin", "mean_reward", "rewards/chosen", "rewards/rejected"):
        assert k in logs[0]


def test_rm_value_head_export_matches_transformers(runs):
    """Qwen2-VL: value_head.safetensors + the HF VLM; rewards by transformers = mvlm's eval."""
    from mvlm.rl.reward_model import load_reward_model

    hf = runs["tmp"] / "vl" / "hf"
    meta = json.loads((hf / "reward_model.json").read_text())
    assert meta["head"] == "value_head" and (hf / "value_head.safetensors").exists()
    ev = _final_eval(runs["tmp"], "vl")
    rm = load_reward_model(hf, dtype=torch.float32)
    enc = _encoded_pair("vl", runs)
    media = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
    rc = float(rm.score_ids(enc["input_ids"], **media))
    rr = float(rm.score_ids(enc["rejected_input_ids"], **media))
    print("vl", rc, ev["eval_rewards/chosen"], rr, ev["eval_rewards/rejected"])
    assert abs(rc - ev["eval_rewards/chosen"]) <= TOL
    assert abs(rr - ev["eval_rewards/rejected"]) <= TOL
    assert rc != rr


def test_rm_seq_cls_export_matches_transformers(runs):
    """Qwen2: a Qwen2ForSequenceClassification directory; logits[:, 0] = mvlm's eval rewards,
    and the text entry point of load_reward_model gives the same."""
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from mvlm.rl.reward_model import load_reward_model

    hf = runs["tmp"] / "txt" / "hf"
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"]
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "score.weight" in keys and "lm_head.weight" not in keys
    model = AutoModelForSequenceClassification.from_pretrained(hf, dtype=torch.float32).eval()
    enc = _encoded_pair("txt", runs)
    ev = _final_eval(runs["tmp"], "txt")
    with torch.no_grad():
        rc = float(model(input_ids=enc["input_ids"][None]).logits[0, 0])
        rr = float(model(input_ids=enc["rejected_input_ids"][None]).logits[0, 0])
    print("txt", rc, ev["eval_rewards/chosen"], rr, ev["eval_rewards/rejected"])
    assert abs(rc - ev["eval_rewards/chosen"]) <= TOL
    assert abs(rr - ev["eval_rewards/rejected"]) <= TOL
    rm = load_reward_model(hf)
    text = rm.tokenizer.decode(enc["input_ids"])
    assert abs(float(rm([text])[0]) - rc) <= TOL
