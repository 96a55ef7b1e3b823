"""mvlm/runtime/lean_optimizer.py and mvlm.runtime.cpu.outside_cpu_mode: fewer Python calls in
the optimizer step, the same values. The whole-step comparison with Megatron-Core's own functions
is in test_runtime_wgrad.py (bit-identical losses, main grads and parameters)."""
from __future__ import annotations

import torch
from megatron.core.utils import local_multi_tensor_l2_norm

from mvlm.runtime import cpu, lean_optimizer


class _Counting(cpu._CudaToCpuMode):
    """The CPU mode (CUDA placements rewritten to CPU) counting the calls it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return super().__torch_function__(func, types, args, kwargs)


def _lists(seed: int, n: int = 150):
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        count = int(torch.randint(1, 70, (1,), generator=g))
        ts = [torch.randn(int(torch.randint(0, 5000, (1,), generator=g)), generator=g)
              * float(torch.rand(1, generator=g)) * 10 for _ in range(count)]
        if k % 3 == 0:  # 2-D gradients
            ts = [t.view(-1, 1) for t in ts]
        if k % 5 == 0 and ts[0].numel():
            ts[0].view(-1)[0] = float("nan") if k % 2 else float("inf")
        yield ts


def test_foreach_l2_norm_is_megatrons_bit_for_bit() -> None:
    lean_optimizer.ORIGINALS.setdefault("l2_norm", local_multi_tensor_l2_norm)
    with _Counting():  # Megatron's function places its result with device="cuda"
        for ts in _lists(0):
            want, _ = local_multi_tensor_l2_norm(2048 * 32, None, [ts], False)
            got, none = lean_optimizer.foreach_l2_norm(2048 * 32, None, [ts], False)
            assert none is None and got.dtype == want.dtype and got.shape == want.shape == (1,)
            assert torch.equal(got, want) or (got.isnan().all() and want.isnan().all()), \
                (got, want)


def test_outside_cpu_mode_takes_only_the_cpu_mode_off(monkeypatch) -> None:
    p = torch.nn.Parameter(torch.ones(6))
    p.grad = torch.ones(6)

    def loop() -> list:
        return [p.grad, p.data, p.grad.view(-1)[2:4]]

    mode = _Counting()
    monkeypatch.setattr(cpu, "_MODE", mode)
    wrapped = cpu.outside_cpu_mode(loop)
    with mode:
        loop()
        inside = mode.calls
        assert inside >= 4
        out = wrapped()
        assert mode.calls == inside  # nothing passed through the mode
        assert torch._C._len_torch_function_stack() == 1  # and it is back
        assert torch.equal(out[2], torch.ones(2))
        x = torch.zeros(1, device="cuda")  # the mode still rewrites after the call
        assert x.device.type == "cpu"

        def fails() -> None:
            raise ValueError("x")

        try:
            cpu.outside_cpu_mode(fails)()
        except ValueError:
            pass
        assert torch._C._len_torch_function_stack() == 1
        # another mode on top of the CPU mode: the function runs as it is, under both
        other = _Counting()
        with other:
            wrapped()
            assert other.calls >= 4
    # no CPU mode installed (a GPU run): a plain call
    monkeypatch.setattr(cpu, "_MODE", None)
    assert torch.equal(cpu.outside_cpu_mode(loop)()[0], torch.ones(6))


def test_to_local_if_dtensor_returns_plain_tensors_at_once() -> None:
    seen = []

    def to_local(t):
        seen.append(t)
        return "local"

    f = lean_optimizer._plain_first(to_local)
    t = torch.ones(2)
    assert f(t) is t and seen == []
    p = torch.nn.Parameter(torch.ones(2))
    assert f(p) == "local" and seen == [p]  # anything but a plain tensor: Megatron's function
