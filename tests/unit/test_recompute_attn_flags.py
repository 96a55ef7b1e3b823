"""--recompute_* and --attn_impl: refused where they could not act, else what they select.

The numerical side (recompute == no recompute, eager == sdpa on the whole model, every layout) is
tests/dist/test_recompute_parity.py; the trainer wiring is tests/e2e/test_nan_stop.py. Here: the
error messages (they name the flag and the fix), the Megatron config fields each setting turns
into, and SDPACoreAttention's kernel choice on the core-attention level (eager vs sdpa within
1e-6, scaled by max(1, |value|), on outputs and q/k/v grads for causal, packed and padded
masks, fp32).
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from mvlm.models.recompute import RecomputeConfig, RecomputeError
from mvlm.train.args import parse_train_args

TOL = 1e-6


@pytest.fixture
def base(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    return ["--model", str(model), "--dataset", str(data), "--output_dir", str(tmp_path / "o")]


@pytest.mark.parametrize("extra,match", [
    (["--recompute_method", "block"], "--recompute_method block has no effect without "
                                      "--recompute_granularity"),
    (["--recompute_num_layers", "2"], "--recompute_num_layers 2 has no effect"),
    (["--recompute_granularity", "none", "--recompute_method", "uniform"], "no effect"),
    (["--recompute_granularity", "selective", "--recompute_method", "uniform"],
     "--recompute_method uniform only applies to --recompute_granularity full"),
    (["--recompute_granularity", "selective", "--recompute_num_layers", "1"],
     "--recompute_num_layers 1 only applies to --recompute_granularity full"),
    (["--recompute_granularity", "full", "--recompute_num_layers", "0"], ">= 1"),
    (["--recompute_granularity", "full", "--recompute_modules", "core_attn"],
     "--recompute_modules core_attn only applies to --recompute_granularity selective"),
    (["--recompute_granularity", "selective", "--recompute_modules", "moe_act"], "grouped-GEMM"),
    (["--recompute_granularity", "selective", "--recompute_modules", "attn"], "unknown; choose"),
    (["--attn_impl", "xformers"], "--attn_impl: 'xformers': use one of auto, flash_attn"),
    (["--attn_impl", "local", "--transformer_impl", "te"], "--attn_impl: local means the local"),
    (["--max_skipped_steps", "-1"], "--max_skipped_steps: must be >= 0"),
    (["--max_skipped_steps", "1", "--check_for_nan_in_loss_and_grad", "false"],
     "skipping needs the check"),
])
def test_refused_with_the_flag_named(base, extra, match):
    with pytest.raises(ValueError, match=match):
        parse_train_args(base + extra, "sft")


def test_accepted_settings_reach_the_config(base):
    cfg = parse_train_args(base + ["--gradient_checkpointing", "true", "--recompute_method",
                                   "block", "--recompute_num_layers", "2"], "sft")
    assert cfg.parallel.recompute == RecomputeConfig("full", "block", 2)
    cfg = parse_train_args(base + ["--recompute_granularity", "selective",
                                   "--recompute_modules", "core_attn", "mlp"], "sft")
    assert cfg.parallel.recompute == RecomputeConfig("selective", modules=["core_attn", "mlp"])
    assert cfg.optim.check_for_nan_in_loss_and_grad  # the default
    cfg = parse_train_args(base + ["--attention_backend", "local"], "sft")
    assert (cfg.base.attn_impl, cfg.base.transformer_impl) == ("eager", "local")
    assert any("--attn_impl local" in n for n in cfg.notes)
    for flag, want in (("flash_attn", "flash"), ("sdpa", "sdpa"), ("eager", "eager"),
                       ("fused", "sdpa"), ("unfused", "eager"), ("auto", "auto")):
        assert parse_train_args(base + ["--attn_impl", flag], "sft").base.attn_impl == want


def _arch(layers=4, experts=None, shared=None):
    return SimpleNamespace(num_layers=layers, num_experts=experts, moe_shared_expert_size=shared)


def _layout(pp=1, vpp=None):
    return SimpleNamespace(pp=pp, vpp=vpp)


@pytest.mark.parametrize("rc,layout,match", [
    (RecomputeConfig("full", "block", 3), _layout(pp=2),
     r"--recompute_num_layers 3 with --recompute_method block exceeds the 2 layers per "
     r"pipeline stage \(num_hidden_layers 4 / --pp 2\): use 1..2"),
    (RecomputeConfig("full", "uniform", 3), _layout(),
     r"must divide the 4 layers per pipeline stage .*: use one of \[1, 2, 4\]"),
    (RecomputeConfig("full", "block", 2), _layout(pp=2, vpp=2), r"--pp 2 / --vpp 2"),
])
def test_layer_count_checks(rc, layout, match):
    with pytest.raises(RecomputeError, match=match):
        rc.megatron_kwargs(_arch(), layout)


def test_selective_modules_must_exist_in_the_model():
    with pytest.raises(RecomputeError, match="MoE model is an MoE layer: use 'moe'"):
        RecomputeConfig("selective", modules=["mlp"]).megatron_kwargs(_arch(experts=8),
                                                                       _layout())
    with pytest.raises(RecomputeError, match="no MoE layers: use 'mlp'"):
        RecomputeConfig("selective", modules=["moe"]).megatron_kwargs(_arch(), _layout())
    with pytest.raises(RecomputeError, match="no shared experts"):
        RecomputeConfig("selective", modules=["shared_experts"]).megatron_kwargs(
            _arch(experts=8), _layout())
    assert RecomputeConfig("selective").megatron_kwargs(_arch(), _layout()) == {
        "recompute_granularity": "selective", "recompute_method": None,
        "recompute_num_layers": None, "recompute_modules": ["core_attn"]}
    assert RecomputeConfig("full").megatron_kwargs(_arch(), _layout()) == {
        "recompute_granularity": "full", "recompute_method": "uniform",
        "recompute_num_layers": 1}


def _text_arch():
    from mvlm.models.gpt import TextArch

    return TextArch(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=8, ffn_hidden_size=64, norm_eps=1e-6, rope_theta=10000.0,
                    max_position_embeddings=128, tie_word_embeddings=False)


def test_transformer_config_fields():
    from mvlm.models.gpt import transformer_config
    from mvlm.runtime.parallel import ParallelLayout

    c = transformer_config(_text_arch(), ParallelLayout(), dtype=torch.float32, device="cpu",
                           recompute=RecomputeConfig("full", "block", 3), attn_impl="eager")
    assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers) == \
        ("full", "block", 3)
    assert c.core_attn_impl == "eager"
    c = transformer_config(_text_arch(), ParallelLayout(), dtype=torch.float32, device="cpu",
                           recompute=RecomputeConfig("selective", modules=["mlp", "layernorm"]))
    assert c.recompute_granularity == "selective" and c.recompute_modules == ["mlp", "layernorm"]
    assert c.core_attn_impl == "auto"
    # on GPUs the TE spec's attention obeys Megatron's attention_backend; CPU runs keep auto
    from megatron.core.transformer.enums import AttnBackend

    for impl, backend in (("flash", AttnBackend.flash), ("sdpa", AttnBackend.fused),
                          ("eager", AttnBackend.unfused), ("auto", AttnBackend.auto)):
        for device, want in (("cuda", backend), ("cpu", AttnBackend.auto)):
            c = transformer_config(_text_arch(), ParallelLayout(), dtype=torch.float32,
                                   device=device, attn_impl=impl)
            assert c.attention_backend == want and c.core_attn_impl == impl, (impl, device)
    with pytest.raises(ValueError, match="--attn_impl 'xla'"):
        transformer_config(_text_arch(), ParallelLayout(), dtype=torch.float32, device="cpu",
                           attn_impl="xla")


def _attn(impl: str):
    from megatron.core.transformer.enums import AttnMaskType

    from mvlm.models.attention import SDPACoreAttention
    from mvlm.models.gpt import transformer_config
    from mvlm.runtime.parallel import ParallelLayout

    c = transformer_config(_text_arch(), ParallelLayout(), dtype=torch.float32, device="cpu",
                           attn_impl=impl)
    return SDPACoreAttention(c, 1, AttnMaskType.causal, "self")


def _qkv(s=12, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, b, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2)]


def _run(mod, qkv, **kw):
    out = mod(*qkv, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return [out, *torch.autograd.grad((out * g).sum(), qkv)]


@pytest.mark.parametrize("case", ["causal", "packed", "padding"])
def test_eager_equals_sdpa(case):
    from megatron.core.packed_seq_params import PackedSeqParams

    kw: dict = {"attention_mask": None}
    b = 2
    if case == "packed":
        b = 1
        cu = torch.tensor([0, 5, 9], dtype=torch.int32)  # positions 9..11: tail segment
        kw["packed_seq_params"] = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu,
                                                  cu_seqlens_kv=cu, max_seqlen_q=5,
                                                  max_seqlen_kv=5)
    if case == "padding":
        mask = torch.zeros(b, 1, 1, 12, dtype=torch.bool)
        mask[0, ..., 9:] = True  # the first row's last 3 keys are padding
        kw["attention_mask"] = mask
    qkv = _qkv(b=b)
    s, e = _attn("sdpa"), _attn("eager")
    rs, re_ = _run(s, qkv, **kw), _run(e, qkv, **kw)
    assert (s.kernel_used, e.kernel_used) == ("sdpa", "eager")
    # scaled by max(1, max|x|) as in test_attention.py: GQA kv grads sum over query heads and
    # reach |g| ~ 5 with these N(0, 1) inputs, where 1e-6 absolute is a couple of fp32 ulp.
    worst = max(float((x - y).abs().max()) / max(1.0, float(x.abs().max()))
                for x, y in zip(rs, re_, strict=True))
    print(f"{case}: eager vs sdpa scaled max|d| (output, dq, dk, dv) = {worst:.2e}")
    assert worst <= TOL


def test_flash_falls_back_once_per_reason_on_cpu(caplog):
    from mvlm.models import attention

    attention._FLASH_FALLBACK_WARNED.discard("tensors are not on a CUDA device")
    f = _attn("flash")
    qkv = _qkv()
    with caplog.at_level(logging.WARNING, logger="mvlm.models.attention"):
        out1 = f(*qkv, attention_mask=None)
        out2 = _attn("flash")(*qkv, attention_mask=None)
    assert f.kernel_used == "sdpa"
    warned = [r.getMessage() for r in caplog.records if "--attn_impl flash_attn" in r.getMessage()]
    assert warned == ["--attn_impl flash_attn: tensors are not on a CUDA device; using torch "
                      "SDPA instead"], warned
    ref = _attn("sdpa")(*qkv, attention_mask=None)
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    a = _attn("auto")
    a(*qkv, attention_mask=None)
    assert a.kernel_used == "sdpa"


def test_nonfinite_grad_report_uses_global_layer_numbers():
    """A NaN reported from pipeline stage 2 names the layer by its global index."""
    from torch import nn

    from mvlm.train.steps import first_nonfinite_grad

    class Stage(nn.Module):
        def __init__(self, offset: int) -> None:
            super().__init__()
            self.decoder = nn.Module()
            self.decoder.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
            for i, layer in enumerate(self.decoder.layers):
                layer.layer_number = offset + i + 1  # Megatron's 1-based global number

    stage = Stage(offset=2)  # the second of two PP stages of a 4-layer model
    for p in stage.parameters():
        p.grad = torch.zeros_like(p)
    assert first_nonfinite_grad([stage]) is None
    stage.decoder.layers[1].bias.grad[0] = float("inf")
    assert first_nonfinite_grad([stage]) == "decoder.layers.3.bias"
