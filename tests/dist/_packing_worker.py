"""Worker for test_model_packing: packed (padding-free) batches through the Megatron VLM.

Checks, on a tiny Qwen2-VL with two image samples and a text-only one packed in one row:
1. each sample's logits in the packed row equal its logits run alone;
2. perturbing one sample's tokens leaves the other samples' logits untouched;
3. the packed token-summed loss equals the sum of the per-sample losses.
Bars (fp32): 1. max |dlogits| <= 2e-6; 3. |dloss| <= 5e-7 relative to the loss (floor 1).
Prints the measured differences; exits non-zero on failure.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


def main(workdir: str) -> int:
    from megatron.core.packed_seq_params import PackedSeqParams
    from PIL import Image

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.data.collate import collate_packed
    from mvlm.data.template import get_template
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    wd = Path(workdir)
    hf = build_tiny_checkpoint("qwen2_vl", wd / "hf")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (56, 84), "b.png": (56, 56), "c.png": (84, 56)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(wd / name)
    rows = [
        {"messages": [{"role": "user", "content": "<image>What colour is it?"},
                      {"role": "assistant", "content": "It is red."}], "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "Say hello."},
                      {"role": "assistant", "content": "hello there"}]},
        {"messages": [{"role": "user", "content": "<image><image>Compare them."},
                      {"role": "assistant", "content": "The first is wider."}],
         "images": ["b.png", "c.png"]},
    ]
    layout = ParallelLayout()
    startup(layout, seed=0, device="cpu")
    tmpl = get_template(hf)
    samples = [tmpl.encode(r, base_dir=str(wd)) for r in rows]
    cfg = __import__("transformers").AutoConfig.from_pretrained(hf)
    bundle = build_model(cfg, layout, dtype=torch.float32, device="cpu",
                         perform_initialization=False)
    load_hf_weights(bundle, hf)
    model = bundle.models[0].eval()

    def run(batch, labels=False):
        cu = batch["cu_seqlens"]
        psp = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                              max_seqlen_q=batch["max_seqlen"], max_seqlen_kv=batch["max_seqlen"])
        with torch.no_grad():
            return model(batch["input_ids"], batch["position_ids"],
                         labels=batch["labels"] if labels else None,
                         pixel_values=batch.get("pixel_values"),
                         image_grid_thw=batch.get("image_grid_thw"), packed_seq_params=psp,
                         gather_logits=not labels)

    packed = collate_packed(samples, tmpl.pad_token_id if hasattr(tmpl, "pad_token_id")
                            else 0, pad_to_multiple_of=16)
    cu = packed["cu_seqlens"].tolist()
    logits = run(packed)[0]
    ok = True
    worst = 0.0
    for i, s in enumerate(samples):
        alone = run(collate_packed([s], 0))[0]
        d = (logits[cu[i]:cu[i + 1]] - alone[: cu[i + 1] - cu[i]]).abs().max().item()
        worst = max(worst, d)
    print(f"packed vs alone: max|dlogits| = {worst:.3e}")
    ok &= worst <= 2e-6  # measured 3.6e-7

    # Perturb the text sample's prompt tokens (leave its last token alone).
    pert = dict(packed)
    pert["input_ids"] = packed["input_ids"].clone()
    s, e = cu[1], cu[2]
    pert["input_ids"][0, s + 2:e - 2] = (pert["input_ids"][0, s + 2:e - 2] + 7) % 600
    logits2 = run(pert)[0]
    others = max((logits2[cu[i]:cu[i + 1]] - logits[cu[i]:cu[i + 1]]).abs().max().item()
                 for i in (0, 2))
    moved = (logits2[s:e] - logits[s:e]).abs().max().item()
    print(f"perturbing sample 1: other samples max|dlogits| = {others:.3e}, "
          f"sample 1 moved by {moved:.3e}")
    ok &= others == 0.0 and moved > 1e-3

    loss_packed = run(packed, labels=True).sum().item()
    loss_sep = sum(run(collate_packed([s], 0), labels=True).sum().item() for s in samples)
    print(f"token-summed loss packed {loss_packed:.6f} vs per-sample {loss_sep:.6f}")
    # relative, floor 1 (a sum over ~150 tokens); measured 5e-8 (8e-6 on 151.43)
    ok &= abs(loss_packed - loss_sep) <= 5e-7 * max(1.0, abs(loss_sep))
    pos = packed["position_ids"][0, 0]
    ok &= all(int(pos[c]) == 0 for c in cu[:-1])
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
