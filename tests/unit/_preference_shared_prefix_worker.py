"""Worker for test_preference_shared_prefix (own process: it sets up Megatron's parallel state).

Tiny Qwen2-VL (mRoPE), three pairs -- two with an image, one text-only -- collated into one
two-segment row, re-laid out by shared_prefix.share_prefix as [prompt][chosen][rejected] per pair.
Checks, printing the measured values:
1. the shared row is shorter by the prompts it no longer repeats, and lists each pair's pixels
   once;
2. each answer's summed log-prob from the shared row equals its sequence run alone (packed as a
   row of one), fp32;
3. with the rejected segment's parent link removed (it may then not see the prompt) the
   log-probs move: the tree mask is what makes 2 hold;
4. step-0 sigmoid DPO on the shared-row log-probs (policy == reference) is ln 2 exactly, rewards 0.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))  # _worker_common
from _worker_common import dpo_step0, tiny_pair_model  # noqa: E402

TOL_REL = 5e-7  # measured 9.4e-8 (fp32 sums of ~10 token log-probs, another summation order)


def main(workdir: str) -> int:
    from mvlm.data import preference as P
    from mvlm.data.collate import collate_packed
    from mvlm.models.registry import get_family
    from mvlm.train.objectives.shared_prefix import placeholder_ids, share_prefix
    from mvlm.train.steps import model_forward

    rows = [
        {"images": ["a.png"], "messages": [{"role": "user", "content": "<image>Colour?"}],
         "chosen": "It is red.", "rejected": "Blue, I think."},
        {"messages": [{"role": "user", "content": "Say hello."}], "chosen": "hello there",
         "rejected": "no"},
        {"images": ["b.png"], "messages": [{"role": "user", "content": "<image>Shape?"}],
         "chosen": "A square.", "rejected": "A long thin triangle."},
    ]
    t = tiny_pair_model(workdir, rows)
    tmpl, encs, cfg, model = t.tmpl, t.encs, t.cfg, t.model
    family = get_family(cfg.model_type)

    def logps(batch):
        with torch.no_grad():
            return P.sequence_sums(-model_forward(model, batch), batch["cu_seqlens"])

    two = P.collate_pairs([encs[0], [encs[1], encs[2]]], tmpl.pad_token_id, pad_to_multiple_of=8)
    shared = share_prefix(two, family.vision.media, family.batch_keys, placeholder_ids(cfg),
                          tmpl.pad_token_id, pad_multiple=8)
    ok = shared is not None
    prompt = [int(s) for s in (shared["cu_seqlens"][1:] - shared["cu_seqlens"][:-1])[0::3]]
    saved = int(two["cu_seqlens"][-1]) - int(shared["cu_seqlens"][-1])
    print(f"tokens: two-segment row {int(two['cu_seqlens'][-1])}, shared-prefix row "
          f"{int(shared['cu_seqlens'][-1])} (shared prompts {prompt}); pixel rows "
          f"{two['pixel_values'].shape[0]} -> {shared['pixel_values'].shape[0]}")
    ok &= saved == sum(prompt) and min(prompt) > 0
    ok &= 2 * shared["pixel_values"].shape[0] == two["pixel_values"].shape[0]
    ok &= "pair_media" not in shared

    lp = logps(shared)
    idx = torch.stack([shared["chosen_index"], shared["rejected_index"]], 1).reshape(-1)
    worst = 0.0
    for k, seq in enumerate(s for e in encs for s in P.pair_sequences(e)):
        alone = float(logps(collate_packed([seq], tmpl.pad_token_id))[0])
        worst = max(worst, abs(float(lp[idx[k]]) - alone) / max(1.0, abs(alone)))
    print(f"shared-prefix row vs each sequence alone: max relative |dlogp| = {worst:.3e} "
          f"(bar {TOL_REL:g})")
    ok &= worst <= TOL_REL

    cut = dict(shared, segment_parent=shared["segment_parent"].clone())
    cut["segment_parent"][shared["rejected_index"]] = -1
    moved = float((logps(cut) - lp)[shared["rejected_index"]].abs().max())
    print(f"rejected answers without the parent link: log-probs move by up to {moved:.3e}")
    ok &= moved > 1e-3

    exact, m = dpo_step0(lp, shared["chosen_index"], shared["rejected_index"])
    print(f"step 0 on the shared row: loss == fp32(ln 2): {exact}, rewards/margins "
          f"{m['rewards/margins']}")
    ok &= exact and m["rewards/chosen"] == 0.0 and m["rewards/margins"] == 0.0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
