"""The flat CPU Adam step (mvlm/runtime/flat_adam.py) against torch.optim.AdamW per parameter.

Parameters are views of one buffer (as Megatron's distributed optimizer hands them over), in two
param groups that interleave (several updates per contiguous chain), with a gap and odd sizes
(ranges that end inside a vector); gradients are views of a second buffer with the same layout.
References, on separate tensors: torch's fused AdamW (``torch.optim.AdamW(fused=True)``) on each
parameter zero-padded to whole thread shares of vectors (what the flat step promises: every
element through the kernel's vector loop), at 1, 2 and 3 threads; torch's own single-tensor
AdamW for the steps that fall back to it and for the unfused path.
"""
from __future__ import annotations

import copy

import pytest
import torch

import mvlm.runtime.flat_adam as flat_adam
from mvlm.runtime.flat_adam import FlatAdamStep, install

SIZES = [(7,), (33,), (4, 16), (1000,), (5, 3), (64,)]
GROUP = [0, 0, 1, 1, 0, 1]
GAP_AFTER = 3  # one unused element after parameter 3 splits a run


def _layout():
    offs, o = [], 0
    for i, s in enumerate(SIZES):
        offs.append(o)
        o += torch.Size(s).numel() + (1 if i == GAP_AFTER else 0)
    return offs, o


def _views(buf, offs):
    return [buf[a:a + torch.Size(s).numel()].view(s) for a, s in zip(offs, SIZES)]


def _groups(params):
    return [{"params": [p for p, g in zip(params, GROUP) if g == 0], "lr": 3e-3,
             "weight_decay": 0.1},
            {"params": [p for p, g in zip(params, GROUP) if g == 1], "lr": 1e-3,
             "weight_decay": 0.0}]


def _setup():
    offs, n = _layout()
    gen = torch.Generator().manual_seed(0)
    pbuf = torch.randn(n, generator=gen)
    gbuf = torch.zeros(n)
    flat_params = _views(pbuf, offs)
    ref_params = [p.detach().clone().requires_grad_(True) for p in flat_params]
    kw = {"betas": (0.9, 0.95), "eps": 1e-8}
    opt = torch.optim.AdamW(_groups(flat_params), **kw)
    ref = torch.optim.AdamW(_groups(ref_params), **kw)
    assert install(type("Megatron", (), {"optimizer": opt})()) == 1
    return offs, gen, gbuf, flat_params, ref_params, opt, ref


def _padded_fused_step(ref):
    """torch's fused AdamW on each parameter of ``ref`` zero-padded to whole thread shares of
    vectors (the flat step's promise), on ``ref``'s own state tensors."""
    unit = flat_adam.VECTOR * torch.get_num_threads()
    for g in ref.param_groups:
        for q in g["params"]:
            if q.grad is None:
                continue
            st = ref.state[q]
            if not st:
                st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(q),
                          exp_avg_sq=torch.zeros_like(q))
            st["step"] += 1
            n = q.numel()
            size = -(-n // unit) * unit
            bufs = [torch.zeros(size) for _ in range(4)]
            for b, t in zip(bufs, (q.detach(), q.grad, st["exp_avg"], st["exp_avg_sq"])):
                b[:n].copy_(t.reshape(-1))
            padded = torch.nn.Parameter(bufs[0])
            padded.grad = bufs[1]
            one = torch.optim.AdamW([padded], lr=g["lr"], betas=g["betas"], eps=g["eps"],
                                    weight_decay=g["weight_decay"], fused=True)
            one.state[padded].update(step=st["step"] - 1, exp_avg=bufs[2], exp_avg_sq=bufs[3])
            one.step()
            with torch.no_grad():
                q.copy_(padded[:n].view_as(q))
            st["exp_avg"].copy_(bufs[2][:n].view_as(q))
            st["exp_avg_sq"].copy_(bufs[3][:n].view_as(q))


def _step(offs, gen, gbuf, flat_params, ref_params, opt, ref, skip=None, fused_ref=None):
    gbuf.copy_(torch.randn(gbuf.shape, generator=gen))
    for i, (p, q, g) in enumerate(zip(flat_params, ref_params, _views(gbuf, offs))):
        p.grad = None if i == skip else g  # a view, new every step, as Megatron sets it
        q.grad = None if i == skip else g.clone()
    opt.step()
    if fused_ref is None:
        fused_ref = skip is None and flat_adam._FUSED[True] is not None
    if fused_ref:
        _padded_fused_step(ref)
    else:
        ref.step()


def _assert_same(flat_params, ref_params, opt, ref):
    for p, q in zip(flat_params, ref_params):
        assert torch.equal(p, q.detach())
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], ref.state[q][k])


@pytest.mark.parametrize("threads,fused", [(1, True), (2, True), (3, True), (1, False)])
def test_flat_adam_bit_identical_to_torch_adamw_with_reload_and_fallback(monkeypatch, threads,
                                                                         fused):
    """fused: every flat step equals the padded per-parameter fused reference bitwise (at any
    thread count); unfused (no fused kernel in torch): torch's single-tensor AdamW bitwise."""
    if not fused:
        monkeypatch.setattr(flat_adam, "_FUSED", {True: None, False: None})
        monkeypatch.setattr(flat_adam, "CHUNK", 96)  # pieces that cut through parameters
    elif flat_adam._FUSED[True] is None:
        pytest.skip("this torch has no fused CPU AdamW kernel")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_flat_adam()
    finally:
        torch.set_num_threads(old_threads)


def _check_flat_adam():
    case = _setup()
    offs, gen, gbuf, flat_params, ref_params, opt, ref = case
    flat = opt.step
    assert isinstance(flat, FlatAdamStep)
    for _ in range(3):
        _step(*case)
    _assert_same(flat_params, ref_params, opt, ref)
    # chains [0..3] | gap | [4, 5]; groups differ in lr and weight decay: 4 updates
    assert flat.flat_steps == 3 and len(flat.chains) == 2 and flat.updates_last_step == 4
    # A checkpoint load puts new state tensors in: copied into the flat buffers, still exact.
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # new tensors, as a load makes
    _step(*case)
    _assert_same(flat_params, ref_params, opt, ref)
    assert flat.flat_steps == 4
    # A parameter without a gradient: torch's own step (it skips that parameter), then unequal
    # step counters keep the per-parameter path; the result still equals the reference.
    _step(*case, skip=1)
    _step(*case, fused_ref=False)
    _assert_same(flat_params, ref_params, opt, ref)
    assert flat.flat_steps == 4
    # Groups with equal hyperparameters (Megatron's no-decay group at weight decay 0): one
    # update per chain, still exact.
    case = _setup()
    offs, gen, gbuf, flat_params, ref_params, opt, ref = case
    for o in (opt, ref):
        o.param_groups[1]["lr"], o.param_groups[1]["weight_decay"] = 3e-3, 0.1
    _step(*case)
    _step(*case)
    _assert_same(flat_params, ref_params, opt, ref)
    assert opt.step.flat_steps == 2 and opt.step.updates_last_step == 2


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_fused_flat_step_is_layout_and_thread_independent(cls):
    """One buffer stepped as one range, and the same values as two shards cut at an odd place
    (a DP layout's shard boundary), at 1 and 2 threads: the same bits everywhere, and within
    fp32 rounding of torch's single-tensor step (AdamW's decoupled decay, Adam's L2 term)."""
    if flat_adam._FUSED[True] is None:
        pytest.skip("this torch has no fused CPU AdamW kernel")
    n, cut = 3001, 1237
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(4)]
    results = []
    old_threads = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for shards in ([(0, n)], [(0, cut), (cut, n)]):
                buf, gbuf = p0.clone(), torch.zeros(n)
                params = [buf[a:b] for a, b in shards]
                opt = cls([{"params": [p]} for p in params], lr=1e-3, betas=(0.9, 0.95),
                          eps=1e-8, weight_decay=0.1)
                if len(shards) == 2:  # two separate optimizers, as two DP ranks have
                    opts = [cls([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
                            for p in params]
                else:
                    opts = [opt]
                for o in opts:
                    install(type("Megatron", (), {"optimizer": o})())
                for g in grads:
                    gbuf.copy_(g)
                    for p, (a, b) in zip(params, shards):
                        p.grad = gbuf[a:b]
                    for o in opts:
                        o.step()
                assert all(o.step.flat_steps == len(grads) for o in opts)
                results.append(buf)
    finally:
        torch.set_num_threads(old_threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    ref = p0.clone().requires_grad_(True)
    loop = cls([ref], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g in grads:
        ref.grad = g.clone()
        loop.step()
    diff = (results[0] - ref.detach()).abs().max().item()
    assert 0 < diff < 1e-6  # another rounding of the same update
