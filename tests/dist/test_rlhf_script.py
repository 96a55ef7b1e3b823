"""The guide's DPO script (§5.5) runs with only the command name changed (`swift` -> `mvlm`).

Scaled down to the tiny Qwen2.5-VL and two local ranks (NPROC_PER_NODE=2 instead of 4, the
model path and dataset local); every other flag is the guide's, `--dpo_loss_type` included (the
older spelling of `--loss_type`, mapped with an info line). The data is in the guide's §5.6
format: the demo's coloured shapes, chosen = the right colour, rejected = another colour. The
run must train on every pair (DPO metrics in logging.jsonl with TRL's names), map the flags it
maps, and export the LoRA adapter in PEFT's layout.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

GUIDE_DPO = r"""
CUDA_VISIBLE_DEVICES=0,1,2,3 \
NPROC_PER_NODE=2 \
swift rlhf \
    --rlhf_type dpo \
    --model {model} \
    --dataset {data} \
    --train_type lora \
    --lora_rank 64 \
    --torch_dtype bfloat16 \
    --beta 0.1 \
    --label_smoothing 0.01 \
    --dpo_loss_type sigmoid \
    --num_train_epochs 2 \
    --per_device_train_batch_size 2 \
    --learning_rate 5e-6 \
    --output_dir {out}
"""

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


def write_colour_pairs(root: Path, n: int = 8, seed: int = 5) -> Path:
    """The demo's colour questions as preference pairs in the guide's format."""
    from mvlm.demo_data import COLOURS, write_demo_dataset

    demo = write_demo_dataset(root, n_train=n, n_val=0, image_size=56, seed=seed,
                              kinds=("colour",))
    names = sorted(COLOURS)
    pairs = []
    for r in (json.loads(x) for x in demo.train.read_text().splitlines()):
        right = r["messages"][-1]["content"]
        wrong = names[(names.index(right) + 1) % len(names)]
        pairs.append({"images": r["images"], "messages": r["messages"][:-1],
                      "chosen": {"role": "assistant", "content": right},
                      "rejected": {"role": "assistant", "content": wrong}})
    path = root / "preference_data.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def test_guide_dpo_script(tmp_path, tiny_ckpt):
    model = tiny_ckpt("qwen2_5_vl")
    data = write_colour_pairs(tmp_path / "data")
    out = tmp_path / "dpo_vlm"
    text = GUIDE_DPO.format(model=model, data=data, out=out).replace("swift rlhf", "mvlm rlhf")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    p = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=840,
                       env=env)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-8000:]
    assert "NPROC_PER_NODE=2 -> torchrun" in log
    assert "--dpo_loss_type sigmoid -> --loss_type sigmoid" in log
    assert "--per_device_train_batch_size 2 -> --micro_batch_size 2" in log
    recs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    # 8 pairs, micro 2 x DP 2 = 4 pairs a step, 2 epochs -> 4 steps
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(all(k in r for k in METRICS) for r in train)
    # step 1: adapters start with B = 0, so the policy is its reference: -log sigmoid(0) = ln 2
    assert abs(train[0]["loss"] - math.log(2)) < 1e-6 and train[0]["rewards/margins"] == 0.0
    # a LoRA run exports its PEFT adapter (as `mvlm sft --train_type lora` does)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
