"""torchrun worker for test_recompute_parity: activation recompute and --attn_impl at model level.

One launch, two ranks, three layouts in turn:

* TP1 (the two ranks are independent data-parallel replicas on the same batch, so each is a
  single-rank run): every recompute variant against no recompute -- the loss and EVERY parameter
  gradient; the same with dropout 0.1 (the recompute must replay the dropout masks: CPU default
  generator + mvlm's CPU RNG tracker, restored by Megatron's CheckpointFunction); and
  ``attn_impl`` eager against sdpa (logits and gradients) with the kernel each layer ran;
* TP2: the variants and the dropout replay on TP-split weights;
* PP2: the variants through Megatron-Core's 1F1B schedule (2 of the 4 layers per stage).

The model is the tiny Qwen2.5-VL with 4 decoder layers, fp32, three micro-batches (text rows and
an image row). Each rank compares its own gradients; the worst difference over the world is
written to the JSON file ``argv[2]`` by rank 0. No assertion here: the test asserts the numbers.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

SEED = 11
CALLS = {"checkpoint": 0, "without_output": 0}


def count_checkpoints() -> None:
    """Count Megatron's checkpoint calls, so a variant that silently did not recompute (and
    therefore trivially matched) shows up as a wrong count."""
    from megatron.core import tensor_parallel

    orig = tensor_parallel.checkpoint
    orig_wo = tensor_parallel.CheckpointWithoutOutput.checkpoint

    def checkpoint(*a, **k):
        CALLS["checkpoint"] += 1
        return orig(*a, **k)

    def without_output(self, *a, **k):
        CALLS["without_output"] += 1
        return orig_wo(self, *a, **k)

    tensor_parallel.checkpoint = checkpoint
    tensor_parallel.CheckpointWithoutOutput.checkpoint = without_output


def build(hf: Path, tp: int, pp: int, recompute=None, attn_impl: str = "auto",
          dropout: float = 0.0):
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup

    layout = ParallelLayout(tp=tp, pp=pp)
    startup(layout, seed=SEED, device="cpu")
    bundle = build_model(AutoConfig.from_pretrained(hf), layout, dtype=torch.float32,
                         device="cpu", perform_initialization=False, recompute=recompute,
                         attn_impl=attn_impl, dropout=dropout)
    load_hf_weights(bundle, hf)
    return bundle


def micro_batches(bundle, hf: Path) -> list[dict]:
    """Two text rows and one image row, padded to one length (PP exchanges fixed shapes)."""
    from mvlm.convert.verify import make_inputs

    ins = dict(make_inputs(bundle, hf, 1))
    t = ins["text"]
    rows = [{k: (v[i:i + 1] if k != "position_ids" else v[:, i:i + 1]) for k, v in t.items()}
            for i in range(t["input_ids"].shape[0])] + [ins["image+text"]]
    seq = max(b["input_ids"].shape[1] for b in rows)
    out = []
    for b in rows:
        b = dict(b)
        n = seq - b["input_ids"].shape[1]
        if n:
            b["input_ids"] = torch.cat([b["input_ids"], b["input_ids"][:, -1:].repeat(1, n)], 1)
            b["labels"] = torch.cat([b["labels"], torch.full((1, n), -100)], 1)
            p = b["position_ids"]
            b["position_ids"] = torch.cat(
                [p, p[..., -1:] + torch.arange(1, n + 1).view(*([1] * (p.dim() - 1)), n)], -1)
        out.append(b)
    return out


def loss_and_grads(bundle, data: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward/backward of all micro-batches through Megatron-Core's schedule (train mode,
    RNG reseeded so dropout variants draw the same masks); the loss is on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mvlm.runtime.parallel import set_seed

    set_seed(SEED)
    CALLS.update(checkpoint=0, without_output=0)
    n_tok = float(sum(int((b["labels"] >= 0).sum()) for b in data))
    for m in bundle.models:
        m.train()
        m.zero_grad(set_to_none=True)

    def step(it, model):
        b = next(it)
        out = model(b["input_ids"], b["position_ids"], labels=b["labels"],
                    pixel_values=b.get("pixel_values"), image_grid_thw=b.get("image_grid_thw"))

        def loss_func(t):
            s = t.sum() / n_tok
            return s, {"loss": s.detach().clone()}

        return out, loss_func

    res = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(data), model=bundle.models,
        num_microbatches=len(data), seq_length=data[0]["input_ids"].shape[1],
        micro_batch_size=1, forward_only=False)
    total = torch.zeros(1, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        total += sum(float(r["loss"]) for r in res)
    if ps.get_data_parallel_rank() != 0:
        total.zero_()
    dist.all_reduce(total)
    grads = {f"{i}.{n}": p.grad.detach().clone() for i, m in enumerate(bundle.models)
             for n, p in m.named_parameters() if p.grad is not None}
    return float(total), grads, dict(CALLS)


def world_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def compare(ref: tuple, other: tuple) -> dict:
    (l0, g0, _), (l1, g1, calls) = ref, other
    if sorted(g0) != sorted(g1):
        raise AssertionError(f"gradient sets differ: {sorted(set(g0) ^ set(g1))}")
    dg = max(float((g0[k] - g1[k]).abs().max()) for k in g0)
    gmax = max(float(g.abs().max()) for g in g0.values())
    return {"dloss": world_max(abs(l0 - l1)), "dgrad": world_max(dg),
            "n_grads": int(world_max(len(g0))), "max_abs_grad": world_max(gmax),
            "loss": l0, "calls": calls}


def variants(per_stage: int) -> dict:
    from mvlm.models.recompute import RecomputeConfig as R

    out = {"full_uniform_1": R("full", "uniform", 1), "full_block_1": R("full", "block", 1),
           "selective_default": R("selective"),
           "selective_attn_mlp_norm": R("selective", modules=["core_attn", "mlp", "layernorm"])}
    if per_stage % 2 == 0:
        out["full_uniform_2"] = R("full", "uniform", 2)
    if per_stage > 2:
        out[f"full_block_{per_stage - 1}"] = R("full", "block", per_stage - 1)
    return out


def kernels(bundle) -> list[str]:
    from mvlm.models.attention import SDPACoreAttention

    return sorted({str(m.kernel_used) for mm in bundle.models for m in mm.modules()
                   if isinstance(m, SDPACoreAttention)})


def check_config(bundle, rc) -> None:
    """The settings reached Megatron-Core's config (not just mvlm's)."""
    c = bundle.config
    want = rc.megatron_kwargs(bundle.arch, _layout_of(c))
    got = {k: getattr(c, k) for k in want}
    if got != want:
        raise AssertionError(f"TransformerConfig has {got}, expected {want}")


def _layout_of(c):
    from mvlm.runtime.parallel import ParallelLayout

    return ParallelLayout(tp=c.tensor_model_parallel_size, pp=c.pipeline_model_parallel_size)


def run_layout(hf: Path, tp: int, pp: int, dropout_too: bool, attn_too: bool) -> dict:
    results: dict = {}
    base = build(hf, tp, pp)
    data = micro_batches(base, hf)
    ref = loss_and_grads(base, data)
    per_stage = base.arch.num_layers // pp
    for name, rc in variants(per_stage).items():
        b = build(hf, tp, pp, recompute=rc)
        check_config(b, rc)
        results[name] = compare(ref, loss_and_grads(b, data))
    if dropout_too:
        ref_d = loss_and_grads(build(hf, tp, pp, dropout=0.1), data)
        results["dropout_effect"] = {"dloss": world_max(abs(ref_d[0] - ref[0]))}
        for name, rc in (("dropout_full_uniform_1", variants(per_stage)["full_uniform_1"]),
                         ("dropout_selective_attn_mlp_norm",
                          variants(per_stage)["selective_attn_mlp_norm"])):
            results[name] = compare(ref_d, loss_and_grads(
                build(hf, tp, pp, recompute=rc, dropout=0.1), data))
    if attn_too:
        from mvlm.convert.verify import mcore_forward

        runs = {}
        for impl in ("sdpa", "eager"):  # each model used right after its build (process groups)
            b = build(hf, tp, pp, attn_impl=impl)
            with torch.no_grad():
                logits = [mcore_forward(b, {k: v for k, v in x.items() if k != "labels"})
                          for x in data]
            runs[impl] = (logits, kernels(b), loss_and_grads(b, data))
        dl = max(float((x - y).abs().max())
                 for x, y in zip(runs["sdpa"][0], runs["eager"][0], strict=True))
        results["eager_vs_sdpa"] = {**compare(runs["sdpa"][2], runs["eager"][2]),
                                    "dlogits": world_max(dl), "kernels_sdpa": runs["sdpa"][1],
                                    "kernels_eager": runs["eager"][1]}
    return results


def main() -> None:
    hf, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    count_checkpoints()
    results = {
        "tp1": run_layout(hf, 1, 1, dropout_too=True, attn_too=True),
        "tp2": run_layout(hf, 2, 1, dropout_too=True, attn_too=False),
        "pp2": run_layout(hf, 1, 2, dropout_too=False, attn_too=False),
    }
    if dist.get_rank() == 0:
        print(json.dumps(results, indent=1), flush=True)
        out.write_text(json.dumps(results, indent=1))
        print("WORKER OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
