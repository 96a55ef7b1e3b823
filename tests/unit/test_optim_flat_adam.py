"""The flat CPU Adam step (mvlm/runtime/flat_adam.py) against torch.optim.AdamW per parameter.

Parameters are views of one buffer (as Megatron's distributed optimizer hands them over), in two
param groups that interleave (several updates per contiguous chain), with a gap and odd sizes
(vector-loop tails); gradients are views of a second buffer with the same layout. Reference:
separate tensors stepped by torch's own single-tensor AdamW.
"""
from __future__ import annotations

import copy

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


def _step(offs, gen, gbuf, flat_params, ref_params, opt, ref, skip=None):
    gbuf.copy_(torch.randn(gbuf.shape, generator=gen))
    for i, (p, q, g) in enumerate(zip(flat_params, ref_params, _views(gbuf, offs))):
        p.grad = None if i == skip else g  # a view, new every step, as Megatron sets it
        q.grad = None if i == skip else g.clone()
    opt.step()
    ref.step()


def _assert_same(flat_params, ref_params, opt, ref):
    for p, q in zip(flat_params, ref_params):
        assert torch.equal(p, q.detach())
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], ref.state[q][k])


def test_flat_adam_bit_identical_to_torch_adamw_with_reload_and_fallback(monkeypatch):
    monkeypatch.setattr(flat_adam, "CHUNK", 96)  # pieces that cut through parameters
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
    _step(*case)
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
