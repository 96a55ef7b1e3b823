"""`mvlm sft --train_type lora|dora` through the real trainer (one two-rank launch).

Runs (tiny Qwen2-VL, mixed image/text rows, fp32 CPU), each a full `mvlm sft` in the shared
process group of ``_train_worker.py``:
1. DoRA at TP2, 3 steps: trainable/total reported, checkpoint holds adapters + optimizer only
   (far smaller than the model), PEFT adapter dir exported;
2. LoRA at TP1 (DP2), 4 steps with a checkpoint at step 2 (reference);
3. the same run stopped after its step-2 checkpoint, then 4. rerun in the same dir: it resumes
   from the adapters-only checkpoint (base weights from --model) and its step 3-4 losses equal
   the uninterrupted run's exactly;
5. `--adapters <dir of run 1>` loads the exported PEFT adapter and continues training at TP1.
"""
from __future__ import annotations

import json
from pathlib import Path

from test_train_parity import _launch, _train_lines, write_data


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def test_lora_sft_checkpoint_resume_adapters(tiny_ckpt, tmp_path):
    vl = tiny_ckpt("qwen2_vl")
    data, _ = write_data(tmp_path / "data")
    o = {k: tmp_path / k for k in ("dora_tp2", "ref", "resumed", "cont")}

    def common(out: Path, steps: int, kind: str = "lora") -> list[str]:
        return ["--model", str(vl), "--dataset", str(data), "--train_type", kind,
                "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0",
                "--torch_dtype", "float32", "--train_iters", str(steps),
                "--micro_batch_size", "1", "--global_batch_size", "4", "--lr", "5e-3",
                "--max_length", "256", "--seed", "0", "--output_dir", str(out),
                "--report_to", "none", "--disable_tqdm", "true"]

    runs = [
        {"name": "dora_tp2", "argv": common(o["dora_tp2"], 3, "dora") + [
            "--tp", "2", "--save_safetensors", "true", "--save_final_checkpoint", "true"]},
        {"name": "ref", "argv": common(o["ref"], 4) + [
            "--save_interval", "2", "--save_safetensors", "false"]},
        {"name": "stopped", "argv": common(o["resumed"], 4) + [
            "--save_interval", "2", "--exit_interval", "2", "--save_safetensors", "false"]},
        {"name": "resumed", "argv": common(o["resumed"], 4) + [
            "--save_interval", "2", "--save_safetensors", "false"]},
        {"name": "continue", "argv": common(o["cont"], 1, "dora") + [
            "--adapters", str(o["dora_tp2"] / "adapter"), "--save_safetensors", "false"]},
    ]
    _launch({"runs": runs}, 2, tmp_path, "tuners_train")

    ad = o["dora_tp2"] / "adapter"
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["r"] == 4
    assert (ad / "adapter_model.safetensors").is_file()
    groups = json.loads((o["dora_tp2"] / "optimizer_groups.json").read_text())
    counts = groups["trainable_numel_rank0"]
    assert 0 < counts["adapters"] < counts["total"] / 10, counts
    ckpt = o["dora_tp2"] / "checkpoint-3" / "model"
    model_bytes = (vl / "model.safetensors").stat().st_size
    # adapters + Adam state + torch_dist metadata: far below the fp32 model alone
    assert _dir_bytes(ckpt) < model_bytes / 3, (_dir_bytes(ckpt), model_bytes)

    ref = [(r["step"], r["loss"]) for r in _train_lines(o["ref"])]
    res = [(r["step"], r["loss"]) for r in _train_lines(o["resumed"])]
    assert ref[-1][1] < ref[0][1], ref
    assert [x for x in res if x[0] > 2] == [x for x in ref if x[0] > 2], (res, ref)
    assert _train_lines(o["cont"]), "the --adapters run did not train"
