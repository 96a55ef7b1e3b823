"""The CPU step adaptations (mvlm/runtime/wgrad.py, lean_ops.py, lean_optimizer.py) against
Megatron-Core's own code path: two Trainers on the same tiny Qwen2 weights, one with the
adaptations (what ``wrap_ddp`` installs), one with Megatron's linear function, DDP hook, zeroing
and gradient sync, RoPE (the adapted one runs lean_ops.RotateHalf), clip scaling, gated MLP
forward (SwiGLU), the cross entropy's row maximum, the grad norm, ``to_local_if_dtensor`` and the
optimizer's gradient/parameter copies and zeroing (with the CPU mode on) swapped back in; three
steps of two micro-batches each (gradient accumulation), clipping active. Untied embeddings:
every loss, main grad and parameter is bit-identical. Tied embeddings (the output layer's weight
gets a second gradient through DDP's hook): the first micro-batch is exact, the second adds the
two contributions one after the other instead of summed first, so equality holds to fp32
rounding.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from mvlm.runtime import wgrad

_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    import torch
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
    from megatron.core.transformer.mlp import MLP
    from mvlm.config import (FreezeConfig, OptimConfig, ParallelConfig, ScheduleConfig,
                             TrainConfig)
    from mvlm.models.vlm import build_model
    from mvlm.runtime import cpu_malloc, gated_mlp, lean_ops, lean_optimizer, wgrad
    from mvlm.runtime.parallel import ParallelLayout, destroy_distributed
    from mvlm.runtime.startup import startup
    from mvlm.testing.tiny_models import tiny_config
    from mvlm.train.objectives import get_objective
    from mvlm.train.trainer import Trainer

    torch.set_num_threads(1)
    layout = ParallelLayout()
    startup(layout, seed=3, device="cpu")
    wgrad.install(); lean_ops.install(); lean_optimizer.install()
    DOPT = distrib_optimizer.DistributedOptimizer
    patched = {"linear": (layers, "LinearWithGradAccumulationAndAsyncCommunication"),
               "zero_grad_buffer": (DDP, "zero_grad_buffer"),
               "make_hook": (DDP, "_make_backward_post_hook"),
               "finish_grad_sync": (DDP, "finish_grad_sync"),
               "start_grad_sync": (DDP, "start_grad_sync"),
               "rope": (rope_utils, "_apply_rotary_pos_emb_bshd"),
               "scale": (clip_grads, "multi_tensor_scale_impl"),
               "mlp_forward": (MLP, "forward"),
               "logits_max": (VocabParallelCrossEntropy, "calculate_logits_max"),
               "l2_norm": (clip_grads, "l2_norm_impl"),
               "to_local": (clip_grads, "to_local_if_dtensor"),
               "zero_helper": (distrib_optimizer, "_zero_grad_group_helper"),
               "zero_helper_base": (optimizer, "_zero_grad_group_helper"),
               "_copy_model_grads_to_main_grads": (DOPT, "_copy_model_grads_to_main_grads"),
               "_copy_main_params_to_model_params": (DOPT, "_copy_main_params_to_model_params"),
               "grads_for_norm": (optimizer.MegatronOptimizer, "get_main_grads_for_grad_norm")}
    originals = {**wgrad.ORIGINALS, **lean_ops.ORIGINALS, **lean_optimizer.ORIGINALS,
                 "zero_helper_base": lean_optimizer.ORIGINALS["zero_helper"]}
    adapted = {k: getattr(o, n) for k, (o, n) in patched.items()}

    def use(table):
        for k, (o, n) in patched.items():
            setattr(o, n, table[k])

    def trainer(tmp, name, bundle):
        cfg = TrainConfig(
            task="sft", output_dir=str(Path(tmp) / name),
            optim=OptimConfig(lr=1e-3, min_lr=1e-3, lr_decay_style="constant",
                              weight_decay=0.0, clip_grad=0.05,
                              check_for_nan_in_loss_and_grad=True),
            freeze=FreezeConfig(freeze_vit=False, freeze_aligner=False, freeze_llm=False),
            parallel=ParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=False),
            schedule=ScheduleConfig(micro_batch_size=2, global_batch_size=4))
        t = Trainer(cfg, bundle, layout, objective=get_objective("sft"), device="cpu")
        t.build_scheduler(100)
        return t

    def batch(seed):
        ids = torch.randint(3, 900, (2, 24), generator=torch.Generator().manual_seed(seed))
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        return {"input_ids": ids, "labels": labels,
                "position_ids": torch.arange(24).expand(3, 2, 24).contiguous()}

    def compare(tied):
        hf = tiny_config("qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128,
                         tie_word_embeddings=tied)
        a = build_model(hf, layout, dtype=torch.float32, device="cpu")
        b = build_model(hf, layout, dtype=torch.float32, device="cpu")
        b.models[0].load_state_dict(a.models[0].state_dict())
        with tempfile.TemporaryDirectory() as tmp:
            ta = trainer(tmp, "a", a)
            use(originals)
            real_mark, wgrad.mark_ddp = wgrad.mark_ddp, lambda ddp: 0
            tb = trainer(tmp, "b", b)
            wgrad.mark_ddp = real_mark
            use(adapted)
            marked = len(ta.ddp_models[0]._mvlm_direct_params)
            res = {"marked": marked, "loss_diff": [], "grad_diff": [], "param_diff": [],
                   "clipped": [], "direct_writes": 0}
            for step in range(3):
                batches = [batch(2 * step), batch(2 * step + 1)]
                out_a = ta.train_step([dict(x) for x in batches])
                res["direct_writes"] += sum(
                    not getattr(p, wgrad.FRESH, True) for p in ta.ddp_models[0]._mvlm_direct_params)
                use(originals)
                out_b = tb.train_step([dict(x) for x in batches])
                use(adapted)
                pa = dict(ta.ddp_models[0].named_parameters())
                pb = dict(tb.ddp_models[0].named_parameters())
                res["loss_diff"].append(abs(out_a.stats.loss - out_b.stats.loss))
                res["grad_diff"].append(max(float((pa[n].main_grad - pb[n].main_grad).abs().max())
                                            for n in pa))
                res["param_diff"].append(max(float((pa[n] - pb[n]).abs().max()) for n in pa))
                res["clipped"].append(out_a.update.applied and out_a.update.grad_norm > 0.05)
            res["rope_tables"] = "last" in lean_ops._TABLES
            res["partial_resets"] = [
                (b.reset.calls, sum(g.numel() for g in b.reset.gaps), b.grad_data.numel())
                for b in ta.ddp_models[0].buffers if isinstance(b.reset, wgrad.PartialReset)]
            res["lean_optimizer"] = (adapted["l2_norm"] is lean_optimizer.foreach_l2_norm
                                     and all(getattr(adapted[k], "_mvlm_outside_cpu_mode", False)
                                             for k in ("zero_helper", "grads_for_norm",
                                                       "_copy_model_grads_to_main_grads")))
            res["swiglu_calls"] = SWIGLU_CALLS[0]
            res["fused_calls"] = FUSED_CALLS[0]
            res["rotate_calls"] = ROTATE_CALLS[0]
            res["malloc"] = cpu_malloc.status()  # what the CPU Trainer did (runtime/cpu_malloc.py)
        return res

    def counted(fn_class):  # the calls of an autograd Function's apply, in a 1-element list
        calls, apply = [0], fn_class.apply

        def counting(*args):
            calls[0] += 1
            return apply(*args)

        fn_class.apply = counting
        return calls

    SWIGLU_CALLS = counted(lean_ops.SwiGLU)
    FUSED_CALLS = counted(gated_mlp.Fc1SwiGLU)
    ROTATE_CALLS = counted(lean_ops.RotateHalf)

    res = {}
    for mode in ("untied", "tied", "unfused"):
        SWIGLU_CALLS[0] = FUSED_CALLS[0] = ROTATE_CALLS[0] = 0
        if mode == "unfused":  # fc1 and the SwiGLU as two nodes (lean_ops.SwiGLU)
            gated_mlp.applies = lambda fc1, x: False
        res[mode] = compare(mode == "tied")
    print(json.dumps(res))
    destroy_distributed()
""")


@pytest.fixture(scope="module")
def results() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MVLM_CPU_MALLOC",
                        "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES",
                        "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["untied", "tied", "unfused"])
def test_adapted_step_equals_megatron_path(results, mode):
    res = results[mode]
    # the adaptations ran: weights marked, written directly, RoPE tables cached, clipping active
    assert res["marked"] > 0 and res["direct_writes"] > 0 and res["rope_tables"], res
    assert res["lean_optimizer"], res
    # the buffer's zeroing skipped the marked weights' ranges (every parameter of this model:
    # the rest is alignment padding), one reset per step
    [(calls, zeroed, size)] = res["partial_resets"]
    assert calls == 3 and 0 < zeroed < size // 100, res
    assert all(res["clipped"]), res
    # the lean MLP ran on the adapted side only, 2 layers x 2 micro-batches x 3 steps: as one
    # node (gated_mlp.Fc1SwiGLU), or with it turned off as linear_fc1 + lean_ops.SwiGLU
    fused = 0 if mode == "unfused" else 12
    assert (res["fused_calls"], res["swiglu_calls"]) == (fused, 12 - fused), res
    # RoPE's RotateHalf too: query and key of 2 layers x 2 micro-batches x 3 steps
    assert res["rotate_calls"] == 24, res
    # the CPU Trainer set glibc's thresholds for training (no user setting in the environment)
    assert res["malloc"] == {"applied": True, "reason": None}, res
    if mode != "tied":
        assert res["loss_diff"] == [0.0] * 3, res
        assert res["grad_diff"] == [0.0] * 3, res
        assert res["param_diff"] == [0.0] * 3, res
    else:  # the tied weight's two contributions are added in another order: fp32 rounding
        assert max(res["loss_diff"]) <= 1e-6, res
        assert max(res["param_diff"]) <= 1e-6, res


def _chunk(module: torch.nn.Module) -> SimpleNamespace:
    """What :func:`wgrad.mark_ddp` reads of a Megatron DDP chunk: its config and module, with an
    fp32 ``main_grad`` on every parameter as DDP's gradient buffer gives it."""
    for p in module.parameters():
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
    return SimpleNamespace(ddp_config=SimpleNamespace(overlap_grad_reduce=False), module=module)


def test_bf16_and_hooked_weights_keep_megatron_backward(monkeypatch):
    """bf16 weights (fp32 main_grad: the GEMM cannot write across dtypes; CI's bf16 runs failed
    on exactly that) and weights with a gradient hook (the hook must see a gradient) are not
    marked; a plain fp32 weight is."""
    monkeypatch.setattr(wgrad, "_INSTALLED", True)
    fp32, bf16, hooked = (torch.nn.Linear(4, 4, bias=False) for _ in range(3))
    bf16.to(torch.bfloat16)
    hooked.weight.register_hook(lambda g: g)
    ddp = _chunk(torch.nn.ModuleList([fp32, bf16, hooked]))
    assert wgrad.mark_ddp(ddp) == 1
    assert ddp._mvlm_direct_params == [fp32.weight]
    assert not getattr(bf16.weight, wgrad.DIRECT, False)
    assert not getattr(hooked.weight, wgrad.DIRECT, False)


def test_partial_reset_skips_marked_ranges_and_dirty_ones_are_zeroed_before_use():
    """A gradient buffer with three weights (two marked) and padding: the reset zeroes only the
    unmarked weight and the padding; a dirty range is overwritten by the GEMM, zeroed before DDP's
    hook adds, and zeroed before the gradient reduction if nothing wrote it (an unused weight)."""
    data = torch.full((40,), 7.0)
    shapes = {"a": (2, 5), "b": (3, 4), "c": (2, 3)}  # a: 0-10, b: 10-22, c: 22-28, pad 28-40
    params, off = {}, 0
    for name, shape in shapes.items():
        p = torch.nn.Parameter(torch.zeros(shape))
        n = p.numel()
        p.main_grad = data[off:off + n].view(shape)
        params[name], off = p, off + n
    reset = wgrad.partial_reset(data, [params["a"], params["c"]])
    assert reset is not None and [g.numel() for g in reset.gaps] == [12, 12]
    reset()
    assert torch.equal(data[10:22], torch.zeros(12)) and torch.equal(data[28:], torch.zeros(12))
    assert torch.equal(data[:10], torch.full((10,), 7.0))  # skipped: stale until written
    a, c = params["a"], params["c"]
    assert getattr(a, wgrad.FRESH) and getattr(a, wgrad.DIRTY) and getattr(c, wgrad.DIRTY)
    go, x = torch.randn(4, 2), torch.randn(4, 5)
    wgrad.write_weight_grad(a, go, x)  # fresh: the product overwrites the stale values
    assert torch.equal(a.main_grad, go.t() @ x) and not getattr(a, wgrad.DIRTY)
    # DDP's hook adds into main_grad: the stale values go first
    seen = []
    hook = wgrad._hook_marks_written(
        lambda self, p: lambda *args: seen.append(p.main_grad.clone()))(None, c)
    c.grad = torch.ones(2, 3)
    hook()
    assert torch.equal(seen[0], torch.zeros(2, 3)) and not getattr(c, wgrad.DIRTY)
    # next step: c is not used; the reduction sees zeros, not last step's gradient
    data[22:28] = 5.0
    reset()
    ddp = SimpleNamespace(_mvlm_direct_params=[a, c])
    sync = wgrad._clean_before(lambda self: seen.append(data.clone()))
    wgrad.write_weight_grad(a, go, x)
    sync(ddp)
    assert torch.equal(seen[-1][22:28], torch.zeros(6))
    assert torch.equal(seen[-1][:10], (go.t() @ x).view(-1))
    assert reset.calls == 2
    # overlapping views or another storage: no partial reset
    other = torch.nn.Parameter(torch.zeros(4))
    other.main_grad = torch.zeros(4)
    assert wgrad.partial_reset(data, [other]) is None
    overlap = torch.nn.Parameter(torch.zeros(4))
    overlap.main_grad = data[8:12]
    assert wgrad.partial_reset(data, [a, overlap]) is None
