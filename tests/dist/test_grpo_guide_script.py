"""The guide's multimodal GRPO script (§5.3) with its reward plugin (§5.4), scaled down.

Changed from the guide: the command name (`swift` -> `mvlm`), ``--use_vllm false`` (the built-in
engine) without the three vLLM server flags (``--vllm_mode server``, host, port: they address a
server that is not started here, and mvlm refuses server flags without ``--use_vllm true``), and
the sizes: the tiny Qwen2.5-VL and the demo's coloured shapes in the R1-V format (``solution``
= ``<answer>colour</answer>``) instead of the 3B model and GEOQA,
one local rank instead of 6 (the rank mapping is test_rlhf_script's), 8 completion tokens
instead of 1024, per-device batch 1, 2 generations. Every other flag is the
guide's, ``--deepspeed zero3`` included (mapped to Megatron's distributed optimizer with an
info line). The plugin file is the guide's, unchanged: ``from swift.plugin import ORM, orms``
and ``math_verify``, without ms-swift installed.

Checked: the run finishes; the flag mappings are announced; both reward functions are
logged on each of the 2 steps (4 prompts, 1 x 2 accumulation a step); step 1 (the
policy is the rollout policy and the reference) has ratio 1 and KL 0 exactly; step 2 reuses
step 1's rollout (``--num_iterations 2``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GUIDE_GRPO = r"""
WANDB_API_KEY=your_wandb_api_key \
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5 \
MAX_PIXELS=401408 \
NPROC_PER_NODE=1 \
swift rlhf \
    --rlhf_type grpo \
    --model {model} \
    --external_plugins {plugin} \
    --reward_funcs external_r1v_acc format \
    --use_vllm false \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --dataset {data} \
    --max_completion_length 8 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 1 \
    --learning_rate 1e-6 \
    --gradient_accumulation_steps 2 \
    --num_generations 2 \
    --temperature 1.0 \
    --repetition_penalty 1.1 \
    --beta 0.001 \
    --max_grad_norm 0.5 \
    --num_iterations 2 \
    --deepspeed zero3 \
    --output_dir {out}
"""

PLUGIN = r'''# examples/train/grpo/plugin/plugin.py
from swift.plugin import ORM, orms
from typing import List
import re
from math_verify import parse, verify

class MultiModalAccuracyORM(ORM):
    """多模态准确率奖励函数"""

    def __call__(self, completions, solution, **kwargs) -> List[float]:
        rewards = []
        for content, sol in zip(completions, solution):
            reward = 0.0

            # 1. 符号验证
            try:
                answer = parse(content)
                if float(verify(answer, parse(sol))) > 0:
                    reward = 1.0
            except Exception:
                pass

            # 2. 字符串匹配验证
            if reward == 0.0:
                try:
                    sol_match = re.search(r'<answer>(.*?)</answer>', sol)
                    ground_truth = sol_match.group(1).strip() if sol_match else sol.strip()

                    content_match = re.search(r'<answer>(.*?)</answer>', content)
                    student_answer = content_match.group(1).strip() if content_match else content.strip()

                    if student_answer == ground_truth:
                        reward = 1.0
                except Exception:
                    pass

            rewards.append(reward)
        return rewards

# 注册奖励函数
orms['external_r1v_acc'] = MultiModalAccuracyORM
'''  # noqa: E501


def write_r1v_rows(root: Path, n: int = 4) -> Path:
    """The demo's shapes questions as R1-V rows: a user turn with the image, ``solution``."""
    from mvlm.demo_data import write_demo_dataset

    demo = write_demo_dataset(root, n_train=n, n_val=0, image_size=56, seed=7)
    rows = []
    for r in (json.loads(x) for x in demo.train.read_text().splitlines()):
        rows.append({"images": [str((demo.train.parent / p).resolve()) for p in r["images"]],
                     "messages": r["messages"][:-1],
                     "solution": f"<answer>{r['messages'][-1]['content']}</answer>"})
    path = root / "r1v.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


def test_guide_grpo_script(tmp_path, tiny_ckpt):
    model = tiny_ckpt("qwen2_5_vl")
    data = write_r1v_rows(tmp_path / "data")
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "grpo"
    text = GUIDE_GRPO.format(model=model, data=data, plugin=plugin, out=out)
    text = text.replace("swift rlhf", "mvlm rlhf")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    p = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=840,
                       env=env)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-8000:]
    assert "--deepspeed zero3 -> --use_distributed_optimizer true" in log
    assert "--per_device_train_batch_size 1 -> --micro_batch_size 1" in log
    recs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    print(json.dumps(train, indent=1))
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        for f in ("external_r1v_acc", "format"):
            assert 0.0 <= r[f"rewards/{f}/mean"] <= 1.0
    s1, s2 = train
    assert s1["ratio/mean"] == 1.0 and s1["kl"] == 0.0
    assert s2["time/rollout_s"] == 0.0 and s2["reward"] == s1["reward"]
