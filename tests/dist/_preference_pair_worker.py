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

import sys

import torch
from _worker_common import dpo_step0, tiny_pair_model


def main(workdir: str) -> int:
    from megatron.core.packed_seq_params import PackedSeqParams

    from mvlm.data import preference as P

    rows = [
        {"images": ["a.png"], "messages": [{"role": "user", "content": "<image>Colour?"}],
         "chosen": {"role": "assistant", "content": "It is red."},
         "rejected": {"role": "assistant", "content": "Blue, I think."}},
        {"messages": [{"role": "user", "content": "Say hello."}], "chosen": "hello there",
         "rejected": "no"},
        {"images": ["b.png"], "messages": [{"role": "user", "content": "<image>Shape?"}],
         "chosen": "A square.", "rejected": "A long thin triangle."},
    ]
    t = tiny_pair_model(workdir, rows)
    tmpl, encs, model = t.tmpl, t.encs, t.model

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
    exact, m = dpo_step0(logps, batch["chosen_index"], batch["rejected_index"])
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
