"""ms-swift users' scripts run with only the command name changed (`swift`/`megatron` -> `mvlm`).

Two scripts in the shape of the ms-swift VLM guide, scaled down to the tiny Qwen2.5-VL: the
HF-Trainer flavour (`swift sft`: per-device batch, accumulation, warmup_ratio, eval/save steps,
deepspeed zero2, model_type) and the Megatron flavour (`megatron sft`: NPROC_PER_NODE=2, TP=2,
load_safetensors, packing, recompute, sequence parallel, save/save_interval). Each must train,
log, checkpoint and write HF safetensors, and the flag mappings must be reported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SWIFT_SCRIPT = r"""
CUDA_VISIBLE_DEVICES=0 \
swift sft \
    --model {model} \
    --dataset {data} \
    --split_dataset_ratio 0.2 \
    --train_type full \
    --torch_dtype float32 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 2 \
    --per_device_eval_batch_size 2 \
    --learning_rate 1e-4 \
    --freeze_vit true \
    --gradient_accumulation_steps 2 \
    --eval_strategy steps \
    --eval_steps 2 \
    --save_steps 2 \
    --save_total_limit 1 \
    --logging_steps 1 \
    --max_length 256 \
    --output_dir {out} \
    --warmup_ratio 0.05 \
    --lr_scheduler_type cosine \
    --dataloader_num_workers 0 \
    --model_type qwen2_5_vl \
    --deepspeed zero2 \
    --report_to tensorboard
"""

MEGATRON_SCRIPT = r"""
PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' \
NPROC_PER_NODE=2 \
megatron sft \
    --model {model} \
    --load_safetensors true \
    --save_safetensors true \
    --dataset {data} \
    --split_dataset_ratio 0.2 \
    --train_type full \
    --tensor_model_parallel_size 2 \
    --sequence_parallel true \
    --packing true \
    --freeze_vit true \
    --micro_batch_size 1 \
    --global_batch_size 2 \
    --recompute_granularity full \
    --recompute_method uniform \
    --recompute_num_layers 1 \
    --finetune true \
    --cross_entropy_loss_fusion true \
    --lr 1e-4 \
    --lr_warmup_fraction 0.05 \
    --min_lr 1e-5 \
    --max_epochs 1 \
    --save {out} \
    --save_interval 4 \
    --eval_interval 4 \
    --max_length 128 \
    --num_workers 0 \
    --dataset_num_proc 1 \
    --no_save_optim true \
    --no_save_rng true \
    --attention_backend flash
"""


def _run(script: str, tool: str, tmp: Path, model: Path, data: Path) -> tuple[Path, str]:
    out = tmp / tool
    text = script.format(model=model, data=data, out=out).replace(f"{tool} sft", "mvlm sft")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    p = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=600,
                       env=env)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-8000:]
    return out, log


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    from mvlm.demo_data import write_demo_dataset

    tmp = tmp_path_factory.mktemp("scripts")
    demo = write_demo_dataset(tmp / "data", n_train=20, n_val=0, image_size=56, seed=5)
    return tmp, tiny_ckpt("qwen2_5_vl"), demo.train


def _check(out: Path) -> list[dict]:
    recs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert train and all(k in train[0] for k in ("step", "loss", "lr", "grad_norm",
                                                  "consumed_samples", "tokens_per_sec"))
    assert any("eval_loss" in r for r in recs)
    hf = out / "hf"  # one file, or one shard per writing rank with an index (TP>1 export)
    assert (out / "latest").exists()
    assert (hf / "model.safetensors").exists() or (hf / "model.safetensors.index.json").exists()
    return train


def test_swift_hf_trainer_script(setup):
    tmp, model, data = setup
    out, log = _run(SWIFT_SCRIPT, "swift", tmp, model, data)
    train = _check(out)
    # 16 train rows, global batch 2 x 2 = 4 -> 4 steps; save_total_limit 1 keeps one checkpoint
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[-1]["consumed_samples"] == 16
    assert len(list(out.glob("checkpoint-*"))) == 1
    for line in ("--per_device_train_batch_size 2 -> --micro_batch_size 2",
                 "--gradient_accumulation_steps 2 -> --global_batch_size 4",
                 "--deepspeed zero2 -> --use_distributed_optimizer true",
                 "--model_type ignored"):
        assert line in log, line
    assert list((out / "runs").glob("events.out.tfevents.*"))


def test_megatron_script(setup):
    tmp, model, data = setup
    out, log = _run(MEGATRON_SCRIPT, "megatron", tmp, model, data)
    train = _check(out)
    assert train[-1]["loss"] < train[0]["loss"] + 1.0
    assert "NPROC_PER_NODE=2 -> torchrun" in log
    assert "--tensor_model_parallel_size -> --tp" in log and "--save -> --output_dir" in log
