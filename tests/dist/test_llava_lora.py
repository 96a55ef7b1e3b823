"""LoRA on LLaVA (LLaVA-NeXT: any-resolution tiles, image_newline; LLaVA-OneVision: SigLIP,
anyres-max tiles) at TP2: peft
loads the run's adapters onto the transformers model with the logits of the merged export, on an
image prompt.

`mvlm sft --train_type lora --target_modules all-linear --tp 2` for 2 steps on image + text rows
(fp32, ms-swift's default freezes: ViT frozen), then peft loads ``run/adapter`` onto the original
``LlavaForConditionalGeneration`` and `mvlm export --merge_lora true` writes merged weights: the
two give the same logits on an image prompt (bound 1e-5 as test_export_lora; measured 8.3e-7
at most, LLaVA-OneVision, on 2026-12-04), and the adapters moved the model (1.1). So LLaVA's
LoRA module paths (``model.language_model.*`` in transformers' module tree,
``language_model.model.*`` on the hub) are right.
"""
from __future__ import annotations

import pytest
import torch
from helpers import run_mvlm
from test_train_parity import write_data

pytestmark = pytest.mark.dist

TOL = 1e-5


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_llava_lora_tp2_peft_equals_merged(tiny_ckpt, tmp_path, family):
    import peft
    import transformers

    from mvlm.data.template import get_template
    from mvlm.models.registry import get_family

    base = tiny_ckpt(family)
    spec = get_family(family)
    data, _ = write_data(tmp_path / "data")
    run = tmp_path / "run"
    run_mvlm(["sft", "--model", str(base), "--dataset", str(data), "--train_type", "lora",
              "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0",
              "--target_modules", "all-linear", "--torch_dtype", "float32", "--train_iters", "2",
              "--micro_batch_size", "1", "--global_batch_size", "2", "--lr", "5e-2",
              "--max_length", "256", "--seed", "0", "--output_dir", str(run), "--tp", "2",
              "--report_to", "none", "--disable_tqdm", "true", "--save_safetensors", "true"],
             nproc=2, timeout=900)
    merged = tmp_path / "merged"
    run_mvlm(["export", "--model", str(run), "--merge_lora", "true", "--output", str(merged)])

    def load(path):
        return getattr(transformers, spec.hf_model_class).from_pretrained(
            path, dtype=torch.float32).eval()

    adapted = peft.PeftModel.from_pretrained(load(base), str(run / "adapter")).eval()
    assert any("language_model" in n and "lora_A" in n for n, _ in adapted.named_parameters())
    row = [r for r in (__import__("json").loads(x) for x in data.read_text().splitlines())
           if r.get("images")][0]
    enc = get_template(base).encode(row)
    batch = {k: v for k, v in enc.items() if k in spec.batch_keys}
    inputs = spec.hf_forward_inputs(load(base).config, {"input_ids": enc["input_ids"][None],
                                                        **batch})
    with torch.no_grad():
        a, m, b = (x(**inputs).logits for x in (adapted, load(merged), load(base)))
    d, moved = (a - m).abs().max().item(), (a - b).abs().max().item()
    print(f"{family} LoRA TP2: peft vs merged max|dlogits| {d:.2e}; trained vs base {moved:.2e}")
    assert d <= TOL
    assert moved > 1e-2
