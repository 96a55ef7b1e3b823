"""LoRA/DoRA cases in one process group (torchrun or a single in-process rank).

A case = (layout, adapter kind): build the tiny Qwen2-VL at that layout, load the HF weights,
apply adapters (LLM all-linear + vision tower, non-zero B so every path matters from step 0),
train 3 steps with Megatron-Core's forward_backward_func and torch Adam on the adapters, and
report the losses, whether any base tensor changed, and (optionally) export artefacts.
A layout whose data-parallel ranks all see the same batch without gradient sync equals the
single-rank run, so TP1 on two ranks is the in-launch reference.
Spec (JSON, argv[1]): {"hf": DIR, "out": JSON, "cases": [{"name", "tp", "pp", "kind"}]}.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

STEPS = 3


def build(hf_dir: Path, tp: int = 1, pp: int = 1, kind: str = "lora", include_vision=True,
          rank: int = 4, modules_to_save: tuple[str, ...] = ()):
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.tuners import AdapterConfig, apply_adapters

    layout = ParallelLayout(tp=tp, pp=pp)
    startup(layout, seed=1, device="cpu")
    cfg = AutoConfig.from_pretrained(hf_dir)
    bundle = build_model(cfg, layout, dtype=torch.float32, device="cpu",
                         perform_initialization=False)
    load_hf_weights(bundle, hf_dir)
    acfg = AdapterConfig(kind=kind, rank=rank, alpha=2.0 * rank, target_modules=["all-linear"],
                         include_vision=include_vision, b_init_std=0.05,
                         modules_to_save=list(modules_to_save), seed=7)
    report = apply_adapters(bundle, acfg)
    return bundle, acfg, report


def batches(bundle, hf_dir: Path) -> list[dict]:
    from mvlm.convert.verify import make_inputs

    ins = dict(make_inputs(bundle, hf_dir, 1))
    t = ins["text"]
    rows = [{k: (v[i:i + 1] if k != "position_ids" else v[:, i:i + 1]) for k, v in t.items()}
            for i in range(t["input_ids"].shape[0])]
    return ([ins["image+text"]] if "image+text" in ins else []) + rows


def base_snapshot(bundle) -> dict[str, torch.Tensor]:
    from mvlm.tuners import is_adapter_param

    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(bundle.models)
            for n, p in m.named_parameters() if not is_adapter_param(n) and not p.requires_grad}


def train_steps(bundle, data: list[dict], steps: int = STEPS, lr: float = 1e-2) -> list[float]:
    """Megatron schedule + Adam on the trainable parameters; returns the global loss per step
    (token mean over the step's micro-batches), equal on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    params = [p for m in bundle.models for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    fb = get_forward_backward_func()
    n_tok = float(sum(int((b["labels"] >= 0).sum()) for b in data))
    for m in bundle.models:
        m.train()
    out = []
    for _ in range(steps):
        opt.zero_grad()

        def step(it, model):
            b = next(it)
            loss = model(b["input_ids"], b["position_ids"], labels=b["labels"],
                         pixel_values=b.get("pixel_values"),
                         image_grid_thw=b.get("image_grid_thw"))

            def loss_func(t):
                s = t.sum() / n_tok
                return s, {"loss": s.detach().clone()}

            return loss, loss_func

        seq = max(b["input_ids"].shape[1] for b in data)
        if len({b["input_ids"].shape[1] for b in data}) > 1 or any(
                b["input_ids"].shape[0] != 1 for b in data):
            raise ValueError("micro-batches must be [1, seq] of one length")
        res = fb(forward_step_func=step, data_iterator=iter(data), model=bundle.models,
                 num_microbatches=len(data), seq_length=seq, micro_batch_size=1,
                 forward_only=False)
        opt.step()
        total = torch.zeros(1, dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and \
                ps.get_tensor_model_parallel_rank() == 0:
            total += sum(float(r["loss"]) for r in res)
        # sum over the last stage's TP-rank-0 ranks of ONE data-parallel replica
        if ps.get_data_parallel_rank() != 0:
            total.zero_()
        dist.all_reduce(total)
        out.append(float(total))
    return out


def same_length(data: list[dict]) -> list[dict]:
    """Pad every micro-batch (text, image) to one length with masked tokens (PP needs it)."""
    seq = max(b["input_ids"].shape[1] for b in data)
    out = []
    for b in data:
        b = dict(b)
        n = seq - b["input_ids"].shape[1]
        if n:
            b["input_ids"] = torch.cat([b["input_ids"], b["input_ids"][:, -1:].repeat(1, n)], 1)
            b["labels"] = torch.cat([b["labels"], torch.full((1, n), -100)], 1)
            p = b["position_ids"]
            last = p[..., -1:]
            b["position_ids"] = torch.cat(
                [p, last + torch.arange(1, n + 1).view(*([1] * (p.dim() - 1)), n)], -1)
        out.append(b)
    return out


def text_batches(bundle, n: int = 2, seq: int = 24) -> list[dict]:
    from mvlm.models.positions import batch_position_ids

    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 500, (1, seq), generator=g)
        lab = torch.full_like(ids, -100)
        lab[:, :-1] = ids[:, 1:]
        lab[:, : seq // 3] = -100
        out.append({"input_ids": ids, "labels": lab,
                    "position_ids": batch_position_ids(bundle.hf_config, ids, None)})
    return out


def run_case(hf_dir: Path, case: dict) -> dict:
    bundle, acfg, report = build(hf_dir, case.get("tp", 1), case.get("pp", 1), case["kind"])
    data = same_length(batches(bundle, hf_dir))
    snap = base_snapshot(bundle)
    losses = train_steps(bundle, data)
    changed = [k for k, v in snap.items()
               if not torch.equal(v, dict(_named(bundle))[k])]
    n_changed = torch.tensor([len(changed)])
    dist.all_reduce(n_changed)
    res = {"losses": losses, "base_changed": int(n_changed), "trainable": report.trainable,
           "total": report.total}
    if case.get("export"):
        from mvlm.tuners import export_peft_adapter

        export_peft_adapter(bundle, acfg, case["export"], base_model_dir=hf_dir)
    return res


def _logits(bundle, inputs) -> list[torch.Tensor]:
    from mvlm.convert.verify import mcore_forward

    return [mcore_forward(bundle, b) for _, b in inputs]


def _hf_logits(model, inputs) -> list[torch.Tensor]:
    from mvlm.convert.verify import _hf_forward

    with torch.no_grad():
        return [_hf_forward(model, b)[0] for _, b in inputs]


def _maxdiff(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def peft_checks(hf_dir: Path, case: dict) -> dict:
    """Single rank: train, then compare the mvlm logits with (1) HF base + peft.PeftModel on the
    exported adapter dir, (2) HF on the merged export, (3) mvlm reloading the adapter dir."""
    import transformers
    from peft import PeftModel

    from mvlm.convert.verify import make_inputs
    from mvlm.tuners import (
        adapter_config_from_peft,
        export_merged_hf,
        export_peft_adapter,
        load_peft_adapter,
    )

    out = Path(case["dir"])
    bundle, acfg, _ = build(hf_dir, kind=case["kind"], modules_to_save=("lm_head",))
    data = same_length(batches(bundle, hf_dir))
    snap = base_snapshot(bundle)
    train_steps(bundle, data)
    inputs = make_inputs(bundle, hf_dir, 1)
    ref = _logits(bundle, inputs)
    export_peft_adapter(bundle, acfg, out / "adapter", base_model_dir=hf_dir)
    export_merged_hf(bundle, hf_dir, out / "merged", torch.float32, overwrite=True)
    after = dict(_named(bundle))
    base_changed = sum(not torch.equal(v, after[k]) for k, v in snap.items())
    cls = getattr(transformers, bundle.family.hf_model_class)
    base = cls.from_pretrained(hf_dir, dtype=torch.float32).eval()
    d_base = _maxdiff(ref, _hf_logits(base, inputs))  # adapters must matter
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    d_peft = _maxdiff(ref, _hf_logits(peft_model, inputs))
    merged = cls.from_pretrained(out / "merged", dtype=torch.float32).eval()
    d_merged = _maxdiff(ref, _hf_logits(merged, inputs))
    # reload into a fresh mvlm model (lm_head back to the HF base first: modules_to_save loads)
    fresh2_cfg = adapter_config_from_peft(out / "adapter")
    bundle2, _, _ = _build_from(hf_dir, fresh2_cfg)
    n = load_peft_adapter(bundle2, out / "adapter")
    d_reload = _maxdiff(ref, _logits(bundle2, inputs))
    return {"base_vs_mvlm": d_base, "peft_vs_mvlm": d_peft, "merged_vs_mvlm": d_merged,
            "reload_vs_mvlm": d_reload, "reloaded_adapters": n,
            "base_changed_after_export": base_changed}


def _build_from(hf_dir: Path, acfg):
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.tuners import apply_adapters

    cfg = AutoConfig.from_pretrained(hf_dir)
    bundle = build_model(cfg, ParallelLayout(), dtype=torch.float32, device="cpu",
                         perform_initialization=False)
    load_hf_weights(bundle, hf_dir)
    return bundle, acfg, apply_adapters(bundle, acfg)


def _named(bundle):
    for i, m in enumerate(bundle.models):
        for n, p in m.named_parameters():
            yield f"{i}.{n}", p.detach()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    results = {}
    for case in spec["cases"]:
        fn = peft_checks if case.get("peft_checks") else run_case
        results[case["name"]] = fn(Path(spec["hf"]), case)
        if dist.get_rank() == 0:
            print("CASE", case["name"], results[case["name"]], flush=True)
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
