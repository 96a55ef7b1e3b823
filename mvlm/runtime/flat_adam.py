"""torch Adam/AdamW on CPU as one fused update per contiguous run of parameters.

Why: without Apex/TE, Megatron-Core steps its fp32 shards with ``torch.optim.AdamW``, which on
CPU runs the single-tensor loop (``foreach`` and ``fused`` default to off there): ~10 operators
and two fresh temporaries per parameter, each a pass over memory. With the distributed optimizer
the fp32 shards are views of DDP's contiguous parameter buffer and their gradients views of the
matching gradient buffer, so neighbouring parameters are one flat range of both buffers, updated
together where their param groups have the same hyperparameters (Megatron's decay / no-decay
groups at weight decay 0). The Adam moments live in flat buffers whose per-parameter views stay
in ``optimizer.state`` (what checkpoints read and write).

The update of a range is torch's fused Adam/AdamW kernel (``torch._fused_adamw_``: the arithmetic
of ``torch.optim.AdamW(fused=True)``, which is also transformers' default ``adamw_torch_fused``),
one pass over the four buffers instead of ~8. That kernel computes an element in one of two ways:
its vector loop (coefficients rounded to fp32) or, for the last ``numel % vector width`` elements
of each thread's share, a scalar loop (coefficients in fp64), so called per parameter or per
shard its result would depend on where a range starts and ends -- on the parallel layout and the
thread count. Here every element takes the vector loop: a range is handed over in lengths that
are a multiple of ``VECTOR`` times the thread count (each thread's share a multiple of every CPU
vector width torch uses), and the rest (fewer elements than that) is stepped in a zero-padded
scratch copy of that length and copied back. An element's update therefore depends only on its
own values, and one rank, any TP/DP layout and any thread count give the same bits. (torch 2.14,
the pinned version, already cuts thread shares at vector boundaries; the thread factor keeps the
promise for a kernel that cuts ``numel / threads``.) Where torch has no fused kernel
(``torch._fused_adamw_`` missing) the range runs torch's single-tensor arithmetic instead
(``_single_tensor_adam``, non-capturable branch: the same operators in the same order) in
cache-sized pieces of ``CHUNK`` elements.

Anything the flat path does not reproduce -- AMSGrad, maximize, capturable or differentiable
groups, non-CPU or non-fp32 tensors, a gradient that is not where the buffer layout puts it,
missing gradients, state replaced by a checkpoint load with unequal step counts -- makes that
step run the original ``torch.optim`` step; state replaced by a load (new tensors) is copied into
the flat buffers first. Installed by :func:`install` from :func:`mvlm.train.optim.build_optimizer`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from mvlm.runtime.cpu import outside_cpu_mode

log = logging.getLogger("mvlm.runtime")

CHUNK = 1 << 20  # elements per piece of the unfused update (4 MB per fp32 operand)
VECTOR = 64  # a multiple of every fp32 vector width of torch's CPU kernels (8 with AVX2, 16 AVX512)
_FUSED = {True: getattr(torch, "_fused_adamw_", None), False: getattr(torch, "_fused_adam_", None)}


@dataclass
class _Chain:
    """Parameters that are back to back in one storage, with flat Adam moments; ``segments``
    are its maximal sub-ranges of one param group, ``(group, start, end)`` in elements."""

    params: list[torch.Tensor]
    offsets: list[int]  # element offset of each parameter from the chain's start
    numel: int
    param_flat: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    denom: torch.Tensor
    avg_views: list[torch.Tensor]
    sq_views: list[torch.Tensor]
    segments: list[tuple[dict, int, int]]


def _supported_group(group: dict) -> bool:
    return not (group.get("amsgrad") or group.get("maximize") or group.get("capturable")
                or group.get("differentiable") or group.get("fused"))


def _chains_of(params: list[tuple[dict, torch.Tensor]]) -> list[list[tuple[dict, torch.Tensor]]]:
    """Split (group, param) pairs into maximal chains: same storage, each parameter starting
    where the previous one ends (no gap: a gap element belongs to nobody we update)."""
    key = sorted(params, key=lambda gp: (gp[1].untyped_storage().data_ptr(),
                                         gp[1].storage_offset()))
    chains: list[list[tuple[dict, torch.Tensor]]] = []
    for g, p in key:
        if chains:
            pp = chains[-1][-1][1]
            if pp.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() \
                    and pp.storage_offset() + pp.numel() == p.storage_offset():
                chains[-1].append((g, p))
                continue
        chains.append([(g, p)])
    return chains


def _hyper(opt: torch.optim.Optimizer, g: dict) -> tuple:
    """What the update of a group depends on: groups with equal tuples update alike."""
    return (float(g["lr"]), g["weight_decay"], g["eps"], tuple(float(b) for b in g["betas"]),
            bool(g.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW))))


class FlatAdamStep:
    """Replacement for ``optimizer.step`` of one ``torch.optim.Adam``/``AdamW`` instance."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.opt = optimizer
        self.original = optimizer.step
        self.chains: list[_Chain] | None = None
        self.param_ids: list[int] = []
        self.step_ids: list[int] = []
        self.scratch: torch.Tensor | None = None  # the fused kernel's padded tail, 4 x unit
        self.flat_steps = 0  # steps taken by the flat path (what the tests check)
        self.updates_last_step = 0  # elementwise updates (merged segments) in the last one

    # ---- layout -------------------------------------------------------------------------------
    def _bind(self) -> list[_Chain] | None:
        """Flat moment buffers for every chain, the current state copied in; None if the layout
        does not allow it (then the original step runs)."""
        pairs = []
        for g in self.opt.param_groups:
            if not _supported_group(g):
                return None
            for p in g["params"]:
                if p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous():
                    return None
                pairs.append((g, p))
        steps = [self.opt.state[p].get("step") for _, p in pairs]
        if any(len(self.opt.state[p]) not in (0, 3) for _, p in pairs):
            return None
        if all(s is None for s in steps):
            step0 = 0.0
        elif any(s is None or not torch.is_tensor(s) for s in steps) or \
                len({id(s) for s in steps}) != len(steps) or len({float(s) for s in steps}) != 1:
            return None  # shared or unequal step counters: per-parameter semantics needed
        else:
            step0 = float(steps[0])
        chains = []
        for chain in _chains_of(pairs):
            ps = [p for _, p in chain]
            offs, o, segments = [], 0, []
            for g, p in chain:
                offs.append(o)
                if segments and segments[-1][0] is g:
                    segments[-1] = (g, segments[-1][1], o + p.numel())
                else:
                    segments.append((g, o, o + p.numel()))
                o += p.numel()
            flat = ps[0].as_strided((o,), (1,), ps[0].storage_offset())
            avg = torch.zeros(o, dtype=torch.float32)
            sq = torch.zeros(o, dtype=torch.float32)
            avg_views = [avg[a:a + p.numel()].view_as(p) for a, p in zip(offs, ps)]
            sq_views = [sq[a:a + p.numel()].view_as(p) for a, p in zip(offs, ps)]
            for p, av, sv in zip(ps, avg_views, sq_views):
                st = self.opt.state[p]
                if st:
                    av.copy_(st["exp_avg"])
                    sv.copy_(st["exp_avg_sq"])
                else:
                    st["step"] = torch.tensor(step0, dtype=torch.float32)
                st["exp_avg"], st["exp_avg_sq"] = av, sv
            chains.append(_Chain(ps, offs, o, flat, avg, sq,
                                 torch.empty(min(o, CHUNK), dtype=torch.float32),
                                 avg_views, sq_views, segments))
        self.param_ids = [id(p) for _, p in pairs]
        self.step_ids = [id(self.opt.state[p]["step"]) for _, p in pairs]
        return chains

    def _bound(self) -> bool:
        """Whether the flat buffers are still the optimizer's state (a checkpoint load or
        ``load_state_dict`` puts new tensors there) for the same parameters and step counters."""
        if self.chains is None:
            return False
        ps = [p for g in self.opt.param_groups for p in g["params"]]
        if [id(p) for p in ps] != self.param_ids or \
                [id(self.opt.state[p].get("step")) for p in ps] != self.step_ids:
            return False
        for c in self.chains:
            for p, av, sv in zip(c.params, c.avg_views, c.sq_views):
                st = self.opt.state[p]
                if st.get("exp_avg") is not av or st.get("exp_avg_sq") is not sv:
                    return False
        return True

    def _grads(self, c: _Chain) -> torch.Tensor | None:
        """The chain's gradients as one flat view, or None unless they are laid out like the
        parameters (Megatron's gradient buffer: same offsets, contiguous, fp32)."""
        g0 = c.params[0].grad
        if g0 is None or g0.dtype != torch.float32 or not g0.is_contiguous():
            return None
        base, store = g0.data_ptr(), g0.untyped_storage().data_ptr()
        for p, off in zip(c.params, c.offsets):
            g = p.grad
            if g is None or g.dtype != torch.float32 or not g.is_contiguous() or \
                    g.data_ptr() != base + 4 * off or g.untyped_storage().data_ptr() != store:
                return None
        return g0.as_strided((c.numel,), (1,), g0.storage_offset())

    # ---- step ---------------------------------------------------------------------------------
    # With the CPU mode off: ~160 attribute reads of the layout check, no device placements.
    @outside_cpu_mode
    @torch.no_grad()
    def __call__(self, closure: Any = None) -> Any:
        if closure is not None:
            return self.original(closure)
        if not self._bound():
            self.chains = self._bind()
            if self.chains is None:
                return self.original()
        grads = [self._grads(c) for c in self.chains]
        if any(g is None for g in grads):
            # torch's step skips parameters without a gradient (their step counters fall
            # behind): look at the counters again before the next flat step
            self.chains = None
            return self.original()
        steps = [self.opt.state[p]["step"] for c in self.chains for p in c.params]
        torch._foreach_add_(steps, 1)
        step = float(steps[0])
        unit = VECTOR * max(1, torch.get_num_threads())
        hyper = {id(g): _hyper(self.opt, g) for g in self.opt.param_groups}
        n = 0
        for c, grad in zip(self.chains, grads):
            # neighbouring segments whose groups have the same hyperparameters: one update
            merged: list[list] = []
            for g, a, b in c.segments:
                if merged and merged[-1][0] == hyper[id(g)] and merged[-1][2] == a:
                    merged[-1][2] = b
                else:
                    merged.append([hyper[id(g)], a, b])
            for h, a, b in merged:
                if _FUSED[h[4]] is not None:
                    self._fused(h, steps[0], unit, c.param_flat[a:b], grad[a:b],
                                c.exp_avg[a:b], c.exp_avg_sq[a:b])
                    n += 1
                    continue
                # cache-sized pieces: the ~8 passes of the update then reread the piece from
                # cache, not the whole buffer from memory (one flat pass is slower than torch's
                # per-parameter loop on a 27 MB buffer); elementwise, so the split changes no bit
                for lo in range(a, b, CHUNK):
                    hi = min(b, lo + CHUNK)
                    self._update(h, step, c.param_flat[lo:hi], grad[lo:hi], c.exp_avg[lo:hi],
                                 c.exp_avg_sq[lo:hi], c.denom[:hi - lo])
                n += 1
        self.updates_last_step = n
        self.flat_steps += 1
        return None

    def _fused(self, h: tuple, step: torch.Tensor, unit: int, param: torch.Tensor,
               grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        """torch's fused kernel on one flat range, every element through its vector loop: the
        range in a length that splits into thread shares of whole vectors, the tail (< ``unit``
        elements) in a zero-padded ``unit``-long scratch copy (zeros step to zeros)."""
        lr, wd, eps, (beta1, beta2), decoupled = h
        fused = _FUSED[decoupled]
        kw = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False,
                  maximize=False)
        n = param.numel()
        body = n - n % unit
        if body:
            fused([param[:body]], [grad[:body]], [exp_avg[:body]], [exp_avg_sq[:body]], [],
                  [step], **kw)
        if body == n:
            return
        tail = n - body
        if self.scratch is None or self.scratch.shape[1] != unit:
            self.scratch = torch.empty(4, unit, dtype=torch.float32)
        self.scratch.zero_()
        views = (param[body:], grad[body:], exp_avg[body:], exp_avg_sq[body:])
        for row, v in zip(self.scratch, views):
            row[:tail].copy_(v)
        sp, sg, sm, sv = self.scratch
        fused([sp], [sg], [sm], [sv], [], [step], **kw)
        for row, v in ((sp, views[0]), (sm, views[2]), (sv, views[3])):
            v.copy_(row[:tail])

    @staticmethod
    def _update(h: tuple, step: float, param: torch.Tensor, grad: torch.Tensor,
                exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, denom: torch.Tensor) -> None:
        """torch's ``_single_tensor_adam`` (non-capturable branch) on one flat range."""
        lr, wd, eps, (beta1, beta2), decoupled = h
        if wd != 0:
            if decoupled:
                param.mul_(1 - lr * wd)
            else:
                grad = grad.add(param, alpha=wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        torch.sqrt(exp_avg_sq, out=denom)
        denom.div_(bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def install(optimizer: Any) -> int:
    """Give every torch Adam/AdamW inside a Megatron-Core (chained) optimizer the flat step when
    all its parameters are CPU fp32; returns how many were given it."""
    done = 0
    for o in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(o, "optimizer", None)
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW) or \
                isinstance(inner.step, FlatAdamStep):
            continue
        ps = [p for g in inner.param_groups for p in g["params"]]
        if not ps or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in ps):
            continue
        if not all(_supported_group(g) for g in inner.param_groups):
            continue
        inner.step = FlatAdamStep(inner)
        done += 1
    if done:
        log.debug("flat CPU Adam step installed on %d optimizer(s)", done)
    return done
