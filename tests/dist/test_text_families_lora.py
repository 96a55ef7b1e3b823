"""LoRA on Llama with ``attention_bias`` (q/k/v and o_proj biases, bias-free MLP) at TP2.

`mvlm sft --train_type lora --target_modules all-linear --tp 2` for 2 steps on text rows (fp32),
then the run's PEFT adapter dir (written at the end of training) is loaded by peft onto the
original transformers model, and `mvlm export --merge_lora true` writes merged HF weights: the
two give the same logits (measured 8.3e-7 on 2026-12-02; bound 1e-5 as in
test_export_lora), and the adapters really changed the model (logits differ from the base).
So the LoRA module paths of this family are the transformers module tree's, and biases on the
row-parallel o_proj survive LoRA, TP and the merge.
"""
from __future__ import annotations

import json

import pytest
import torch
from helpers import run_mvlm

pytestmark = pytest.mark.dist

TOL = 1e-5


@pytest.mark.timeout(1200)
def test_llama_lora_tp2_peft_equals_merged(tiny_ckpt, tmp_path):
    import peft
    import transformers

    base = tiny_ckpt("llama", attention_bias=True, tie_word_embeddings=True)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say the number {i} twice."},
        {"role": "assistant", "content": f"{i} {i}"}]}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    run_mvlm(["sft", "--model", str(base), "--dataset", str(data), "--train_type", "lora",
              "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0",
              "--target_modules", "all-linear", "--torch_dtype", "float32", "--train_iters", "2",
              "--micro_batch_size", "1", "--global_batch_size", "2", "--lr", "5e-2",
              "--max_length", "128", "--seed", "0", "--output_dir", str(run), "--tp", "2",
              "--report_to", "none", "--disable_tqdm", "true", "--save_safetensors", "true"],
             nproc=2, timeout=900)
    merged = tmp_path / "merged"
    run_mvlm(["export", "--model", str(run), "--merge_lora", "true", "--output", str(merged)])

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32).eval()

    adapted = peft.PeftModel.from_pretrained(load(base), str(run / "adapter")).eval()
    assert any("o_proj" in n and "lora_A" in n for n, _ in adapted.named_parameters())
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        a, m, b = (x(input_ids=ids).logits for x in (adapted, load(merged), load(base)))
    d, moved = (a - m).abs().max().item(), (a - b).abs().max().item()
    print(f"llama LoRA TP2: peft vs merged max|dlogits| {d:.2e}; trained vs base {moved:.2e}")
    assert d <= TOL
    assert moved > 1e-2
