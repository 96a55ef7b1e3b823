"""lean_ops' cross-entropy row maximum (``amax`` instead of ``max(...)[0]``) against Megatron-Core's
own ``calculate_logits_max``: the per-token loss and the logits gradient of
``vocab_parallel_cross_entropy`` bit for bit, with -inf (padded-vocabulary) columns, a row whose
maximum is shared by two columns, fp32 and bf16 logits; a NaN row stays NaN."""
from __future__ import annotations

import pytest
import torch

from mvlm.runtime import lean_ops


@pytest.fixture
def tp1(one_rank):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1)
    yield
    parallel_state.destroy_model_parallel()


def _loss_and_grad(base: torch.Tensor, target: torch.Tensor, weights: torch.Tensor):
    from megatron.core import tensor_parallel

    leaf = base.clone().requires_grad_(True)
    loss = tensor_parallel.vocab_parallel_cross_entropy(leaf * 1, target)
    (loss * weights).sum().backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amax_gives_megatrons_bits(tp1, monkeypatch, dtype):
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    lean_ops.install()
    assert VocabParallelCrossEntropy.calculate_logits_max is lean_ops._logits_max
    g = torch.Generator().manual_seed(3)
    s, b, v = 13, 3, 80
    base = (torch.randn(s, b, v, generator=g) * 5).to(dtype)
    base[..., 70:] = float("-inf")
    base[0, 0, 5] = base[0, 0, 9] = 40.0  # a tie at the maximum
    target = torch.randint(0, 70, (s, b), generator=g)
    weights = torch.rand(s, b, generator=g)
    ours = _loss_and_grad(base, target, weights)
    monkeypatch.setattr(VocabParallelCrossEntropy, "calculate_logits_max",
                        lean_ops.ORIGINALS["logits_max"])
    megatron = _loss_and_grad(base, target, weights)
    for a, m in zip(ours, megatron):
        assert torch.equal(a, m)


def test_nan_row_stays_nan():
    x = torch.randn(4, 6)
    x[2, 3] = float("nan")
    _, m = lean_ops._logits_max(x)
    assert m[2].isnan() and torch.equal(m[[0, 1, 3]], x.max(dim=-1)[0][[0, 1, 3]])
