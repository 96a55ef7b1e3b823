"""Worker for test_preference_pairs: preference pairs packed into one row through the Megatron VLM.

On a tiny Qwen2-VL, three pairs (two with an image, one text-only) encoded by
mvlm.data.preference and packed by collate_pairs into ONE row (two pairs in one packed item):
1. each sequence's summed log-prob of its answer tokens (sequence_sums of the model's per-token
   output over cu_seqlens) equals that sequence run alone; bar 1e-6 relative, floor 1;
2. the answer token counts equal the sequences' labelled tokens;
3. step-0 invariant through the model: sigmoid DPO with the same model as policy and reference
   gives ln 2 exactly (fp32) and rewards 0.
Prints the measured values; exits non-zero on failure.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch


def main(workdir: str) -> int:
    from megatron.core.packed_seq_params import PackedSeqParams
    from PIL import Image

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.data import preference as P
    from mvlm.data.template import get_template
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.testing.tiny_models import build_tiny_checkpoint
    from mvlm.train.objectives import dpo_losses as dl

    wd = Path(workdir)
    hf = build_tiny_checkpoint("qwen2_vl", wd / "hf")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (56, 84), "b.png": (56, 56)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(wd / name)
    rows = [
        {"images": ["a.png"], "messages": [{"role": "user", "content": "<image>Colour?"}],
         "chosen": {"role": "assistant", "content": "It is red."},
         "rejected": {"role": "assistant", "content": "Blue, I think."}},
        {"messages": [{"role": "user", "content": "Say hello."}], "chosen": "hello there",
         "rejected": "no"},
        {"images": ["b.png"], "messages": [{"role": "user", "content": "<image>Shape?"}],
         "chosen": "A square.", "rejected": "A long thin triangle."},
    ]
    layout = ParallelLayout()
    startup(layout, seed=0, device="cpu")
    tmpl = get_template(hf)
    encs = P.encode_preference_rows(tmpl, rows, str(wd))
    cfg = __import__("transformers").AutoConfig.from_pretrained(hf)
    bundle = build_model(cfg, layout, dtype=torch.float32, device="cpu",
                         perform_initialization=False)
    load_hf_weights(bundle, hf)
    model = bundle.models[0].eval()

    def per_token_logps(batch):
        cu = batch["cu_seqlens"]
        psp = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                              max_seqlen_q=batch["max_seqlen"], max_seqlen_kv=batch["max_seqlen"])
        with torch.no_grad():
            loss = model(batch["input_ids"], batch["position_ids"], labels=batch["labels"],
                         pixel_values=batch.get("pixel_values"),
                         image_grid_thw=batch.get("image_grid_thw"), packed_seq_params=psp)
        return -loss

    batch = P.collate_pairs([encs[0], [encs[1], encs[2]]], tmpl.pad_token_id,
                            pad_to_multiple_of=8)
    logps = P.sequence_sums(per_token_logps(batch), batch["cu_seqlens"])
    tokens = P.sequence_sums(batch["loss_mask"], batch["cu_seqlens"])
    ok = True
    worst = 0.0
    seqs = [s for e in encs for s in P.pair_sequences(e)]
    for k, s in enumerate(seqs):
        alone = P.collate_pairs([encs[k // 2]], tmpl.pad_token_id)
        lp_alone = P.sequence_sums(per_token_logps(alone), alone["cu_seqlens"])[k % 2]
        worst = max(worst, abs(float(logps[k] - lp_alone)) / max(1.0, abs(float(lp_alone))))
        ok &= int(tokens[k]) == int((s["labels"][1:] != -100).sum())  # targets after shifting
    print(f"packed pair row vs each sequence alone: max relative |dlogp| = {worst:.3e}")
    ok &= worst <= 5e-7
    c, r = batch["chosen_index"], batch["rejected_index"]
    res = dl.dpo_loss(logps[c], logps[r], logps[c].clone(), logps[r].clone(),
                      dl.DPOLossConfig(beta=0.1))
    m = dl.summarize_metrics(res.metrics)
    exact = torch.equal(res.loss, torch.tensor(math.log(2.0), dtype=torch.float32))
    print(f"step 0: loss == fp32(ln 2): {exact}, rewards/chosen "
          f"{m['rewards/chosen']}, rewards/margins {m['rewards/margins']}, "
          f"logps/chosen {m['logps/chosen']:.4f}")
    ok &= exact
    ok &= m["rewards/chosen"] == 0.0 and m["rewards/margins"] == 0.0
    ok &= all(float(x) < 0 for x in logps)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
