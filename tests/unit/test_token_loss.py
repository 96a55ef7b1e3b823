"""``mvlm.models.vlm.token_loss`` on [b, s, V] logits equals the [s, b] round trip it replaced.

The loss used to transpose the model's [b, s, V] logits to [s, b, V] for Megatron-Core's
vocab-parallel cross entropy and the per-token loss back (a copy of the logits forward and of
their gradient backward). The cross entropy works row by row, so running it in [b, s] order must
give the same bits: loss and logits gradient are compared with ``torch.equal`` against the old
expression, with padded-vocabulary columns at -inf (the in-place mask), ignored labels, fp32 and
bf16 logits, and a batch of one (where the transposes were no copies at all).

``VLMModel.sb_token_loss`` goes one step further: GPTModel hands it the output layer's [s, b, V]
logits (no ``transpose(0, 1).contiguous()`` of the logits forward, no copy of their gradient in
the output layer's backward); it must give the bits of the path it replaced, GPTModel's
transposed copy + the in-place padded-vocabulary mask + ``token_loss``.
"""
from __future__ import annotations

import types

import pytest
import torch


@pytest.fixture
def tp1(one_rank):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1)
    yield
    parallel_state.destroy_model_parallel()


def _old(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from megatron.core import tensor_parallel

    safe = labels.clamp(min=0)
    loss = tensor_parallel.vocab_parallel_cross_entropy(
        logits.float().transpose(0, 1).contiguous(), safe.transpose(0, 1).contiguous())
    return loss.transpose(0, 1).contiguous() * (labels >= 0)


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_loss_equals_the_transposed_expression(tp1, b, dtype):
    from mvlm.models.vlm import token_loss

    g = torch.Generator().manual_seed(b)
    s, v, real = 17, 96, 90
    base = (torch.randn(b, s, v, generator=g) * 4).to(dtype)
    labels = torch.randint(0, real, (b, s), generator=g)
    labels[:, :3] = -100
    labels[-1, -1] = -100
    weights = torch.rand(b, s, generator=g)  # a non-uniform upstream gradient

    def run(fn):
        leaf = base.clone().requires_grad_(True)
        logits = leaf * 1  # a fresh non-leaf, as the output layer's
        logits = logits.masked_fill_(torch.arange(v) >= real, float("-inf"))
        loss = fn(logits, labels)
        (loss * weights).sum().backward()
        return loss.detach(), leaf.grad

    new_loss, new_grad = run(token_loss)
    old_loss, old_grad = run(_old)
    assert new_loss.shape == (b, s)
    assert torch.equal(new_loss, old_loss), (new_loss - old_loss).abs().max()
    assert torch.equal(new_grad, old_grad), (new_grad - old_grad).abs().max()
    assert float(new_loss[labels < 0].abs().max()) == 0.0 and float(new_loss[labels >= 0].min()) > 0
    assert float(new_grad[..., real:].abs().max()) == 0.0  # masked columns get no gradient


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sb_token_loss_equals_the_transposed_model_output(tp1, b, dtype):
    from mvlm.models.vlm import VLMModel, token_loss

    g = torch.Generator().manual_seed(10 + b)
    s, v, real = 19, 128, 113
    model = types.SimpleNamespace(vocab_padded=v, arch=types.SimpleNamespace(vocab_size=real))
    model._mask_padded_vocab = types.MethodType(VLMModel._mask_padded_vocab, model)
    base = (torch.randn(s, b, v, generator=g) * 4).to(dtype)  # the output layer's [s, b, V]
    labels = torch.randint(0, real, (b, s), generator=g)
    labels[:, :2] = -100
    labels[0, -1] = -100
    weights = torch.rand(b, s, generator=g)

    def run(new: bool):
        leaf = base.clone().requires_grad_(True)
        logits = leaf * 1
        if new:
            loss = VLMModel.sb_token_loss(model, labels, logits)
        else:  # GPTModel without labels, then VLMModel.forward's mask and token_loss
            loss = token_loss(model._mask_padded_vocab(logits.transpose(0, 1).contiguous()),
                              labels)
        (loss * weights).sum().backward()
        return loss.detach(), leaf.grad

    new_loss, new_grad = run(True)
    old_loss, old_grad = run(False)
    assert new_loss.shape == (b, s) and new_loss.is_contiguous()
    assert torch.equal(new_loss, old_loss), (new_loss - old_loss).abs().max()
    assert torch.equal(new_grad, old_grad), (new_grad - old_grad).abs().max()
    assert float(new_grad[..., real:].abs().max()) == 0.0
    assert float(new_loss[labels < 0].abs().max()) == 0.0 and float(new_loss[labels >= 0].min()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fill_padded_vocab_equals_masked_fill(tp1, dtype):
    """The padded-vocabulary fill: the bits of ``masked_fill_`` with a column mask, forward and
    backward, through the cross entropy (zero gradient at the padded columns: handed on as is)
    and with a gradient that is not zero there (a non-softmax consumer, NaN included): zeroed."""
    from mvlm.models.vlm import FillPaddedVocab, token_loss

    g = torch.Generator().manual_seed(7)
    s, b, v, real = 11, 2, 64, 50
    base = (torch.randn(s, b, v, generator=g) * 4).to(dtype)
    labels = torch.randint(0, real, (s, b), generator=g)
    upstream = torch.randn(s, b, v, generator=g).to(dtype)
    upstream[0, 0, real] = float("nan")
    upstream[1, 1, -1] = 5.0

    def run(new: bool, consumer):
        leaf = base.clone().requires_grad_(True)
        logits = leaf * 1
        if new:
            out = FillPaddedVocab.apply(logits, real)
        else:
            out = logits.masked_fill_(torch.arange(v) >= real, float("-inf"))
        consumer(out).backward()
        return out.detach(), leaf.grad

    for consumer in (lambda x: token_loss(x, labels).sum(),
                     lambda x: (x[..., :real] * upstream[..., :real]).sum()
                     + (torch.where(torch.isinf(x), 0.0, x) * upstream).sum()):
        (new_out, new_grad), (old_out, old_grad) = run(True, consumer), run(False, consumer)
        assert torch.equal(new_out, old_out)
        assert torch.equal(new_grad, old_grad)
        assert float(new_grad[..., real:].abs().max()) == 0.0
    # the backward on a gradient with non-zero and NaN padded columns: zeros there, a copy
    grad = upstream.clone()
    ctx = type("Ctx", (), {"n_real": real})()
    out, none = FillPaddedVocab.backward(ctx, grad)
    assert none is None and out is not grad  # a copy: the incoming gradient is not modified
    assert torch.equal(grad.nan_to_num(0.0), upstream.nan_to_num(0.0)) and grad[0, 0, real].isnan()
    assert float(out[..., real:].abs().max()) == 0.0 and torch.equal(out[..., :real],
                                                                   upstream[..., :real])
    zero = upstream.clone()
    zero[..., real:] = 0.0
    assert FillPaddedVocab.backward(ctx, zero)[0] is zero  # already zero: handed on untouched
