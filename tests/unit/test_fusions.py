"""mvlm.runtime.fusions: the fused kernels chosen per device / spec / installed packages / model,
their wiring into the TransformerConfig, the THD packed layout (equal to sbhd on CPU), and
mvlm.runtime.collectives (DDP collectives skipped on a group of one)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mvlm.runtime.fusions import FUSION_FLAGS, Installed, ModelFeatures, choose_fusions

NOTHING = Installed()
FLASH = Installed(flash_attn=True)
APEX = Installed(apex_wgrad=True)
TE = Installed(transformer_engine=True)
EVERYTHING = Installed(transformer_engine=True, apex_wgrad=True, flash_attn=True)


@pytest.mark.parametrize("backend", ["local", "te"])
@pytest.mark.parametrize("installed", [NOTHING, EVERYTHING])
@pytest.mark.parametrize("moe", [False, True])
def test_cpu_turns_everything_off(backend, installed, moe):
    c = choose_fusions("cpu", backend, installed, ModelFeatures(moe=moe))
    assert not any(c.config_kwargs().values()), c
    assert c.packed_qkv_format == "sbhd"
    assert set(c.reasons) == {*FUSION_FLAGS, "packed_qkv_format"}


def test_cuda_without_te():
    c = choose_fusions("cuda", "local", NOTHING, ModelFeatures())
    assert c.config_kwargs() == {
        "bias_activation_fusion": True, "bias_dropout_fusion": True, "apply_rope_fusion": False,
        "masked_softmax_fusion": False, "gradient_accumulation_fusion": False,
        "moe_grouped_gemm": False}
    assert c.packed_qkv_format == "sbhd"  # no varlen kernel: SDPA with a segment mask
    # flash-attn's varlen kernel: THD, but not under CP (mvlm splits whole rows)
    assert choose_fusions("cuda", "local", FLASH, ModelFeatures()).packed_qkv_format == "thd"
    assert choose_fusions("cuda", "local", FLASH,
                          ModelFeatures(context_parallel=2)).packed_qkv_format == "sbhd"
    # apex's wgrad extension enables gradient-accumulation fusion on the local spec
    assert choose_fusions("cuda", "local", APEX, ModelFeatures()).gradient_accumulation_fusion
    # the local GroupedMLP layout is not in the conversion tables
    assert not choose_fusions("cuda", "local", EVERYTHING, ModelFeatures(moe=True)) \
        .moe_grouped_gemm


def test_cuda_with_te():
    c = choose_fusions("cuda", "te", TE, ModelFeatures(moe=True))
    assert c.config_kwargs() == {
        "bias_activation_fusion": True, "bias_dropout_fusion": True, "apply_rope_fusion": True,
        "masked_softmax_fusion": False, "gradient_accumulation_fusion": True,
        "moe_grouped_gemm": True}
    assert c.packed_qkv_format == "thd"
    assert not choose_fusions("cuda", "te", TE, ModelFeatures()).moe_grouped_gemm  # dense
    # TE installed but the local spec asked for: TE's RoPE kernel still applies, TE's wgrad not
    local = choose_fusions("cuda", "local", TE, ModelFeatures())
    assert local.apply_rope_fusion and not local.gradient_accumulation_fusion
    assert local.packed_qkv_format == "sbhd"


@pytest.mark.parametrize("activation,gated,bias,on", [
    ("silu", True, False, True), ("gelu", True, False, True), ("gelu", False, True, True),
    ("gelu", False, False, False), ("silu", False, False, False),
    ("gelu_pytorch_tanh", True, False, False), ("relu2", False, False, False)])
def test_activation_fusion_follows_the_model(activation, gated, bias, on):
    f = ModelFeatures(activation=activation, gated_mlp=gated, add_bias_linear=bias)
    c = choose_fusions("cuda", "local", NOTHING, f)
    assert c.bias_activation_fusion is on, c.reasons["bias_activation_fusion"]


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        choose_fusions("cuda", "tex", NOTHING, ModelFeatures())


def test_transformer_config_on_cpu_has_no_fusions():
    from transformers import AutoConfig

    from mvlm.models.gpt import transformer_config
    from mvlm.models.registry import get_family
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.testing.tiny_models import tiny_config

    hf = tiny_config("qwen2")
    assert isinstance(hf, AutoConfig.for_model("qwen2").__class__)
    arch = get_family("qwen2").text_arch(hf)
    for backend in (None, "local", "te"):
        cfg = transformer_config(arch, ParallelLayout(), dtype=torch.float32, device="cpu",
                                 backend=backend)
        assert not any(getattr(cfg, k) for k in FUSION_FLAGS)
        assert cfg.packed_qkv_format == "sbhd"


class _Group:
    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n


def test_collectives_skipped_on_a_group_of_one():
    from mvlm.runtime.collectives import skip_on_group_of_one

    calls = []

    def collective(output, input, op=None, group=None, async_op=False):
        calls.append(group.size())
        return "handle"

    f = skip_on_group_of_one(collective)
    buf = torch.arange(6.0)
    assert f(buf, buf, op=None, group=_Group(1), async_op=False) is None and calls == []
    out = torch.zeros(6)
    f(out, buf, group=_Group(1))  # distinct memory: a local copy
    assert torch.equal(out, buf) and calls == []
    assert f(buf, buf, group=_Group(2)) == "handle" and calls == [2]
    assert f(buf, buf, group=_Group(1), async_op=True) == "handle"  # caller waits on a handle
    assert skip_on_group_of_one(f) is f


def test_all_reduce_skipped_on_a_group_of_one():
    from torch.distributed import ReduceOp

    from mvlm.runtime.collectives import all_reduce_skipping_group_of_one

    calls = []

    def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False):
        calls.append((op, group.size() if hasattr(group, "size") else group, async_op))
        return "handle"

    f = all_reduce_skipping_group_of_one(all_reduce)
    t = torch.arange(4.0)
    for op in (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.MIN, ReduceOp.AVG):
        assert f(t, op=op, group=_Group(1)) is None
    assert f(t, group=_Group(1)) is None and calls == []  # default op: SUM
    assert torch.equal(t, torch.arange(4.0))
    # a larger group, an asynchronous call (its handle is waited on) and a scaling reduction run
    assert f(t, group=_Group(2)) == "handle"
    assert f(t, group=_Group(1), async_op=True) == "handle"
    premul = torch.distributed._make_nccl_premul_sum(2.0)
    assert f(t, op=premul, group=_Group(1)) == "handle"
    assert f(t) == "handle"  # no process group initialised: the default group is None
    assert f(t, group=torch.distributed.GroupMember.NON_GROUP_MEMBER) == "handle"
    assert [c[1:] for c in calls] == [(2, False), (1, True), (1, False), (None, False),
                                      (-100, False)]
    assert all_reduce_skipping_group_of_one(f) is f


def test_broadcast_skipped_on_a_group_of_one(monkeypatch):
    from mvlm.runtime.collectives import broadcast_skipping_group_of_one

    calls = []

    def broadcast(tensor, src=None, group=None, async_op=False, group_src=None):
        calls.append((src, group.size() if hasattr(group, "size") else group, async_op,
                      group_src))
        return "handle"

    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 3)
    f = broadcast_skipping_group_of_one(broadcast)
    t = torch.arange(4.0)
    assert f(t, src=3, group=_Group(1)) is None
    assert f(t, group=_Group(1), group_src=0) is None and calls == []
    assert torch.equal(t, torch.arange(4.0))
    # another source (the original raises for it), a larger group, an asynchronous call, no
    # process group, a source given both ways: the original runs
    assert f(t, src=0, group=_Group(1)) == "handle"
    assert f(t, src=3, group=_Group(2)) == "handle"
    assert f(t, src=3, group=_Group(1), async_op=True) == "handle"
    assert f(t, src=3) == "handle"  # no process group initialised: the default group is None
    assert f(t, src=3, group=_Group(1), group_src=0) == "handle"
    assert [(c[0], c[1], c[2]) for c in calls] == [(0, 1, False), (3, 2, False), (3, 1, True),
                                                  (3, None, False), (3, 1, False)]
    assert broadcast_skipping_group_of_one(f) is f


def test_tp_mappings_are_the_identity_on_a_group_of_one():
    from mvlm.runtime.collectives import identity_on_group_of_one

    calls = []

    def mapping(input_, group=None):
        calls.append(group)
        return input_ * 2

    f = identity_on_group_of_one(mapping)
    x = torch.ones(3, requires_grad=True)
    assert f(x, group=_Group(1)) is x and calls == []
    assert torch.equal(f(x, group=_Group(2)), 2 * x.detach()) and len(calls) == 1
    assert torch.equal(f(x), 2 * x.detach()) and calls[-1] is None  # Megatron resolves None
    assert identity_on_group_of_one(f) is f


def test_collectives_install_wraps_megatrons_call_sites():
    from megatron.core.tensor_parallel import layers

    from mvlm.runtime import collectives

    collectives.install()
    assert getattr(torch.distributed.all_reduce, "_mvlm_size_one", False)
    assert getattr(torch.distributed.broadcast, "_mvlm_size_one", False)
    for name in ("copy_to_tensor_model_parallel_region",
                 "reduce_from_tensor_model_parallel_region"):
        assert getattr(getattr(layers, name), "_mvlm_size_one", False)


_THD_SCRIPT = textwrap.dedent("""
    import json, torch
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout, destroy_distributed
    from mvlm.runtime.startup import startup
    from mvlm.testing.tiny_models import tiny_config
    from mvlm.train.steps import model_forward

    startup(ParallelLayout(), seed=3, device="cpu")
    hf = tiny_config("qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128)
    bundle = build_model(hf, ParallelLayout(), dtype=torch.float32, device="cpu")
    model = bundle.models[0]
    lens, tail = [5, 9, 4], 6
    real, seq = sum(lens), sum(lens) + tail
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 900, (1, seq), generator=g)
    pos = torch.zeros(3, 1, seq, dtype=torch.long)
    pos[:, 0, :real] = torch.cat([torch.arange(n) for n in lens])
    labels = torch.full((1, seq), -100)
    labels[0, :real - 1] = ids[0, 1:real]
    batch = {"input_ids": ids, "position_ids": pos, "labels": labels,
             "cu_seqlens": torch.tensor([0, 5, 14, 18], dtype=torch.int32), "max_seqlen": 9}
    from megatron.core.models.common.embeddings import rope_utils
    thd_rope_calls = []
    thd_rope = rope_utils._apply_rotary_pos_emb_thd
    def counted(*a, **k):
        thd_rope_calls.append(1)
        return thd_rope(*a, **k)
    rope_utils._apply_rotary_pos_emb_thd = counted  # proves the THD path ran
    res = {}
    for fmt in ("sbhd", "thd"):
        model.config.packed_qkv_format = fmt
        model.zero_grad(set_to_none=True)
        out = model_forward(model, batch)  # per-token loss [1, seq]
        out[:, :real - 1].sum().backward()
        res[fmt] = (out[:, :real].detach(),
                    torch.cat([p.grad.flatten() for p in model.parameters()]))
    # each sample alone, unpacked: what both layouts must equal
    model.config.packed_qkv_format = "sbhd"
    alone, start = [], 0
    for n in lens:
        b = {"input_ids": ids[:, start:start + n], "position_ids": pos[:, :, start:start + n],
             "labels": labels[:, start:start + n]}
        alone.append(model_forward(model, b).detach())
        start += n
    alone = torch.cat(alone, dim=1)[:, :real - 1]
    print(json.dumps({
        "loss_diff": float((res["sbhd"][0] - res["thd"][0]).abs().max()),
        "grad_diff": float((res["sbhd"][1] - res["thd"][1]).abs().max()),
        "grad_max": float(res["sbhd"][1].abs().max()),
        "alone_diff": float((res["thd"][0][:, :real - 1] - alone).abs().max()),
        "thd_rope_calls": len(thd_rope_calls)}))
    destroy_distributed()
""")


def test_thd_packed_rows_equal_sbhd_on_cpu():
    """The THD layout (what CUDA runs with TE / flash-attn get): the same per-token losses and
    gradients as sbhd, and as each sample run alone, with a pad tail after the last sample."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", _THD_SCRIPT], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["grad_max"] > 0 and res["thd_rope_calls"] > 0, res
    # measured: 0.0 and 0.0 (the same arithmetic), 4.8e-7 against each sample alone
    assert res["loss_diff"] <= 1e-6, res
    assert res["grad_diff"] <= 1e-6, res
    assert res["alone_diff"] <= 2e-6, res


def test_gpu_check_prints_the_kernels_above_its_table():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_kernels", path)
    gc = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gc  # its dataclasses look their module up
    spec.loader.exec_module(gc)
    choice = choose_fusions("cuda", "local", NOTHING, ModelFeatures()).report()
    kernels = {"backend": "local", "attention": ["flash_attn"], "vision_attention": "sdpa",
               "packed_qkv_format": "sbhd (no varlen kernel)",
               "fusions": {n: {"on": choice[n]["on"], "why": choice[n]["why"]}
                           for n in FUSION_FLAGS}}
    row = {"label": "mvlm", "tokens_per_s": 1e4, "tflops": 100.0, "mfu": 0.1,
           "peak_mem_gib": 10.0, "step_s": 1.0, "losses": [1.0], "kernels": kernels}
    lines = gc.format_table([row], 989.0, "H200", "H200").splitlines()
    assert lines[-2].startswith("side") and lines[-1].startswith("mvlm")
    text = "\n".join(lines[:-2])
    assert "attention flash_attn" in text and "packed rows sbhd" in text
    assert "fused: bias_activation_fusion, bias_dropout_fusion" in text
    assert "apply_rope_fusion (Megatron-Core's fused RoPE kernel comes from TE" in text
