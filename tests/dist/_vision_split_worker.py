"""torchrun worker (2 ranks): the vision tower split over TP / CP equals the single-rank model.

One launch, three layouts in turn on the same tiny Qwen2-VL and Qwen2.5-VL checkpoints:
1. TP1 (each rank alone, DP2 without DDP): the references -- features, loss and every
   parameter gradient (as full HF tensors) per case;
2. TP2 with the split (the default): each case's features on every rank, the loss, every
   parameter gradient gathered to HF tensors, and each rank's own vision-parameter gradients;
3. CP2 with the split: the same, after summing the gradients over CP (what Megatron's DDP does).
With three images the ``SplitTower`` callable (what a family's own ``VisionSpec.merge`` gets)
must give the same features too.
Cases: one image, two and three images of different sizes, a text-only micro-batch, and three
images with the ViT frozen and the merger trained (ms-swift's default). Bar: max|diff| /
max(1, max|reference|) <= 1e-6 for all of them (printed per case).
FLOPs (torch.utils.flop_counter) of the vision path (tower forward + backward) on two images of
equal size: each TP2 rank <= 0.55x the TP1 count.
Prints WORKER OK on rank 0 when everything holds; exits 1 otherwise.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

TOL = 1e-6
FLOP_RATIO = 0.55
SEQ = 64
CASES = {
    "one image": [(1, 4, 6)],
    "two images": [(1, 4, 4), (1, 6, 8)],
    "three images": [(1, 4, 4), (1, 4, 6), (1, 6, 8)],
    "text only": [],
    "three images, ViT frozen": [(1, 6, 8), (1, 4, 4), (1, 4, 6)],
}
FLOP_CASE = [(1, 6, 6), (1, 6, 6)]


def make_batch(cfg, family, grids: list[tuple[int, int, int]], seed: int) -> dict:
    """One row of SEQ tokens: text, then each image as vision_start, pads, vision_end."""
    gen = torch.Generator().manual_seed(seed)
    special = {cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
               cfg.video_token_id}
    ids = [int(t) for t in torch.randint(100, 600, (SEQ,), generator=gen)]
    ids = [t + 1 if t in special else t for t in ids]
    pos = 3
    for t, h, w in grids:
        n = t * h * w // 4
        ids[pos:pos + n + 2] = [cfg.vision_start_token_id] + [cfg.image_token_id] * n + \
            [cfg.vision_end_token_id]
        pos += n + 4
    assert pos < SEQ and len(ids) == SEQ
    input_ids = torch.tensor([ids])
    media = {}
    if grids:
        patches = sum(t * h * w for t, h, w in grids)
        media = {"pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=gen),
                 "image_grid_thw": torch.tensor(grids)}
    labels = torch.randint(0, 600, (1, SEQ), generator=gen)
    labels[:, :2] = -100
    return {"input_ids": input_ids, "labels": labels, "media": media,
            "position_ids": family.position_ids(cfg, input_ids, media)}


def build(hf: Path, layout, freeze_vit: bool = False):
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.models.vlm import build_model

    bundle = build_model(AutoConfig.from_pretrained(hf), layout, dtype=torch.float32,
                         device="cpu", perform_initialization=False)
    load_hf_weights(bundle, hf)
    model = bundle.models[0]
    if freeze_vit:  # the ViT frozen, the merger (aligner) trained
        for n, p in model.vision_model.named_parameters():
            p.requires_grad_(n.startswith("tower.merger."))
    return bundle, model


def hf_grads(bundle) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as full HF tensors (TP shards gathered), via the export
    stream with the gradients swapped in for the weights. Collective over the model group."""
    from mvlm.convert.stream import iter_hf_tensors

    model = bundle.models[0]
    saved = []
    for p in model.parameters():
        saved.append(p.data)
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    try:
        return {k: v.clone() for k, v in iter_hf_tensors(bundle, receivers="owners")}
    finally:
        for p, d in zip(model.parameters(), saved):
            p.data = d


def run_case(bundle, model, batch: dict, cp_group) -> dict:
    """Features, summed loss, HF-named grads and the vision grads of this rank."""
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        feats = model.vision_features(batch["media"]) if batch["media"] else {}
    loss = model(batch["input_ids"], batch["position_ids"], labels=batch["labels"],
                 **batch["media"]).sum()
    if not batch["media"]:  # as mvlm.train.steps does for a text-only micro-batch
        loss = loss + sum(p.sum() for p in model.vision_model.parameters()
                          if p.requires_grad) * 0.0
    loss.backward()
    if dist.get_world_size(cp_group) > 1:  # Megatron's DDP sums gradients over DP x CP
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=cp_group)
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=cp_group)
    vision = {n: p.grad.clone() for n, p in model.vision_model.named_parameters()
              if p.grad is not None}
    return {"feats": feats, "loss": loss.detach(), "grads": hf_grads(bundle), "vision": vision}


def compare(ref: dict, got: dict) -> dict[str, tuple[float, str]]:
    """Worst max|diff| / max(1, max|ref|) per part (features, loss, every HF-named gradient,
    this rank's own vision gradients) and the tensor where it is."""
    assert sorted(ref["grads"]) == sorted(got["grads"]), "gradient names differ"
    assert sorted(ref["vision"]) == sorted(got["vision"]), "vision gradient names differ"
    assert sorted(ref["feats"]) == sorted(got["feats"]), "feature kinds differ"
    parts = {"feats": [(k, ref["feats"][k], got["feats"][k]) for k in ref["feats"]],
             "loss": [("loss", ref["loss"], got["loss"])],
             "grads": [(k, ref["grads"][k], got["grads"][k]) for k in ref["grads"]],
             "vit_grads": [(k, ref["vision"][k], got["vision"][k]) for k in ref["vision"]]}
    out = {}
    for part, pairs in parts.items():
        worst, where = 0.0, "-"
        for name, a, b in pairs:
            assert a.shape == b.shape, (name, a.shape, b.shape)
            if a.numel() == 0:
                continue
            d = (a - b).abs().max().item() / max(1.0, a.abs().max().item())
            if d >= worst:
                worst, where = d, name
        out[part] = (worst, where)
    return out


def vision_flops(model, media: dict) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    for p in model.parameters():
        p.grad = None
    w = torch.randn(1024, generator=torch.Generator().manual_seed(5))
    with FlopCounterMode(display=False) as fc:
        feats = model.vision_features(media)
        sum((f * w[: f.shape[-1]]).sum() for f in feats.values()).backward()
    return fc.get_total_flops()


def main(workdir: str) -> int:
    from megatron.core import parallel_state

    from mvlm.models.registry import get_family
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    wd = Path(workdir)
    startup(ParallelLayout(), seed=0, device="cpu")
    rank = dist.get_rank()
    families = ("qwen2_vl", "qwen2_5_vl")
    if rank == 0:
        for fam in families:
            build_tiny_checkpoint(fam, wd / fam)
    dist.barrier()
    ok = True
    refs: dict = {}
    ref_flops: dict = {}
    for name, layout in (("TP1", ParallelLayout()), ("TP2", ParallelLayout(tp=2)),
                         ("CP2", ParallelLayout(cp=2))):
        startup(layout, seed=0, device="cpu")
        cp_group = parallel_state.get_context_parallel_group()
        for fam in families:
            hf = wd / fam
            bundle, model = build(hf, layout)
            split = model.vision_split
            assert (split is None) == (name == "TP1"), (name, split)
            cfg = bundle.hf_config
            family = get_family(cfg.model_type)
            frozen = None
            for i, (case, grids) in enumerate(CASES.items()):
                if "frozen" in case:
                    frozen = frozen or build(hf, layout, freeze_vit=True)
                    b, m = frozen
                else:
                    b, m = bundle, model
                out = run_case(b, m, make_batch(cfg, family, grids, seed=i), cp_group)
                key = (fam, case)
                if name == "TP1":
                    refs[key] = out
                    continue
                diffs = compare(refs[key], out)
                if case == "three images":  # the callable a family's own VisionSpec.merge gets
                    from mvlm.models.vision_parallel import SplitTower

                    media = make_batch(cfg, family, grids, seed=i)["media"]
                    with torch.no_grad():
                        alone = SplitTower(m.vision_model, split)(
                            media["pixel_values"], media["image_grid_thw"])
                    ref = refs[key]["feats"]["image"]
                    diffs["SplitTower"] = ((alone - ref).abs().max().item()
                                           / max(1.0, ref.abs().max().item()), "image")
                good = all(d <= TOL for d, _ in diffs.values())
                ok &= good
                print(f"[{name} rank {rank}] {fam} {case}: " + "; ".join(
                    f"{part} {d:.1e}" + (f" ({w})" if d > TOL else "")
                    for part, (d, w) in diffs.items()) + ("" if good else f"  > {TOL}"),
                    flush=True)
            media = make_batch(cfg, family, FLOP_CASE, seed=99)["media"]
            flops = vision_flops(model, media)
            if name == "TP1":
                ref_flops[fam] = flops
            else:
                ratio = flops / ref_flops[fam]
                good = name != "TP2" or ratio <= FLOP_RATIO
                ok &= good
                print(f"[{name} rank {rank}] {fam} vision FLOPs (fwd+bwd, 2 equal images) "
                      f"{flops} = {ratio:.3f}x TP1{'' if good else ' > ' + str(FLOP_RATIO)}",
                      flush=True)
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    parallel_state.destroy_model_parallel()
    if flag.item() and rank == 0:
        print("WORKER OK", flush=True)
    dist.destroy_process_group()
    return 0 if flag.item() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
