"""torchrun worker (2 ranks) for test_ckpt_te_names.py: every check in ONE launch.

Spec (JSON, argv[1]): {"root": DIR, "families": {family: hf_dir}, "train": {name: argv},
"results": FILE}. Rank 0 writes the facts and numbers to ``results``; the test asserts on them.

Per family, at a save layout (TP1 x DP2) the worker writes three checkpoints of the model loaded
from HF:
- ``new``: ``save_mcore`` as it is now (local spec);
- ``te``: what a Transformer Engine run writes, built here without the keys map so it does not
  depend on the code under test: the local keys renamed with this file's own TE table, TE-style
  fp8 ``_extra_state`` payloads on the linears, ``_extra_state`` entries for the norms TE keeps as
  TENorm (final, q/k, MoE pre-MLP) and for ``core_attention`` (older Megatron-Core + TE);
- ``old``: format 1, i.e. ``save_mcore`` with the keys map disabled and no format fields;
- ``te_v1``: ``te`` without the format fields (format 1 as a TE run wrote it: TE names already);
- ``te_bad``: ``te`` plus one tensor the model does not have (``layer_norm_bias``).
Then at another layout (TP2 for the dense VL model, EP2 for the MoE) each is loaded under the
local spec and compared with the same model loaded straight from HF: every tensor with
torch.equal, logits with max |delta|. A model whose norms carry ``_extra_state`` (as TE's do)
loads the ``new`` checkpoint, and two broken cases must fail with CheckpointFormatError.
Training: a run stopped at step 2 (legacy writer / TE-like norms) and rerun must log exactly what
the uninterrupted run logged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _worker_common import drop_groups, worker_process_group

PAYLOAD = b"te-fp8-meta:scale=1.0;amax_history=[0.5]"  # stands in for TE's pickled fp8 state
# This test's own statement of TE's checkpoint names (local-spec key fragment -> TE's).
TE_DENSE = {".layers.input_layernorm.": ".layers.self_attention.linear_qkv.layer_norm_",
            ".layers.pre_mlp_layernorm.": ".layers.mlp.linear_fc1.layer_norm_"}
TE_MOE = {".layers.input_layernorm.": ".layers.self_attention.linear_qkv.layer_norm_"}


def payload() -> torch.Tensor:
    return torch.frombuffer(bytearray(PAYLOAD), dtype=torch.uint8).clone()


def rank0() -> bool:
    return dist.get_rank() == 0


def make_te_like_norm_class():
    from mvlm.models.norm import RMSNorm

    class TENormLike(RMSNorm):
        """RMSNorm whose state has an ``_extra_state``, like TE's TENorm (fp8 metadata)."""

        def get_extra_state(self):
            return payload()

        def set_extra_state(self, state):
            self.extra_loaded = state

    return TENormLike


def te_norms(bundle):
    """The norms TE keeps as separate modules (with ``_extra_state``): final, q/k, MoE pre-MLP."""
    out = []
    for m in bundle.models:
        lm = m.language_model
        if getattr(lm.decoder, "final_layernorm", None) is not None:
            out.append(lm.decoder.final_layernorm)
        for layer in lm.decoder.layers:
            att = layer.self_attention
            for n in ("q_layernorm", "k_layernorm"):
                if type(getattr(att, n)).__name__ != "IdentityOp":
                    out.append(getattr(att, n))
            if bundle.config.num_moe_experts:
                out.append(layer.pre_mlp_layernorm)
    return out


@contextlib.contextmanager
def te_like_norms(bundle):
    cls = make_te_like_norm_class()
    norms = te_norms(bundle)
    old = [n.__class__ for n in norms]
    for n in norms:
        n.__class__ = cls
    try:
        yield norms
    finally:
        for n, c in zip(norms, old, strict=True):
            n.__class__ = c


@contextlib.contextmanager
def keys_map_disabled(bundle):
    """The pre-change local spec: no sharded_state_dict_keys_map on the transformer layers."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    saved = []
    for m in bundle.models:
        for mod in m.modules():
            if isinstance(mod, TransformerLayer):
                cfg = mod.submodules_config
                saved.append((cfg, dict(cfg.sharded_state_dict_keys_map)))
                cfg.sharded_state_dict_keys_map = {}
    try:
        yield
    finally:
        for cfg, km in saved:
            cfg.sharded_state_dict_keys_map = km


def entries(sd):
    from mvlm.convert.ckpt_format import _sharded_entries

    return list(_sharded_entries(sd))


def build_from_hf(hf: Path, layout):
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.models.vlm import build_model
    from mvlm.runtime.startup import startup

    startup(layout, seed=1234, device="cpu")
    bundle = build_model(AutoConfig.from_pretrained(hf), layout, dtype=torch.float32,
                         device="cpu", backend="local", perform_initialization=False)
    load_hf_weights(bundle, hf)
    return bundle


def fresh_dir(p: Path) -> None:
    if rank0():
        shutil.rmtree(p, ignore_errors=True)
        (p / "model").mkdir(parents=True)
    dist.barrier()


def copy_meta(src: Path, dst: Path, **changes) -> None:
    """rank 0: mvlm_meta.json and hf/ of ``src`` into ``dst``, with fields set (None = removed)."""
    if rank0():
        meta = json.loads((src / "mvlm_meta.json").read_text())
        for k, v in changes.items():
            if v is None:
                meta.pop(k, None)
            else:
                meta[k] = v
        (dst / "mvlm_meta.json").write_text(json.dumps(meta, indent=2))
        if not (dst / "hf").exists():
            shutil.copytree(src / "hf", dst / "hf")
    dist.barrier()


def save_te_sim(bundle, out: Path, like: Path, moe: bool, extra_tensor: bool = False) -> None:
    """A torch_dist checkpoint as a TE run writes it (see the module docstring)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from mvlm.convert.mcore_ckpt import model_sharded_state_dict

    with te_like_norms(bundle), keys_map_disabled(bundle):
        sd = model_sharded_state_dict(bundle)
    table = TE_MOE if moe else TE_DENSE
    added = {}
    for sh in entries(sd):
        for a, b in table.items():
            sh.key = sh.key.replace(a, b)
        if isinstance(sh, ShardedObject) and sh.key.endswith("._extra_state") and sh.data is None:
            sh.data = payload()  # TE linears carry their fp8 metadata here
        if isinstance(sh, ShardedObject) and sh.key.endswith(
                "layers.self_attention.linear_qkv._extra_state"):
            key = sh.key.replace("linear_qkv._extra_state", "core_attention._extra_state")
            added[f"{key}@{sh.global_offset}"] = dataclasses.replace(sh, key=key, data=payload())
        if extra_tensor and isinstance(sh, ShardedTensor) and sh.key.endswith(
                "layers.self_attention.linear_qkv.layer_norm_weight"):
            key = sh.key.replace("layer_norm_weight", "layer_norm_bias")
            added[f"{key}@{sh.global_offset}"] = dataclasses.replace(
                sh, key=key, data=torch.zeros_like(sh.data))
    sd["model"]["te_added"] = added
    fresh_dir(out)
    dist_checkpointing.save(sd, str(out / "model"))
    copy_meta(like, out, layer_spec="te")


def ckpt_facts(d: Path) -> dict:
    from mvlm.convert.ckpt_format import checkpoint_keys

    keys = sorted(checkpoint_keys(d / "model"))
    lm = [k for k in keys if k.startswith("language_model.decoder.layers.")]
    meta = json.loads((d / "mvlm_meta.json").read_text())
    return {"keys": lm, "extra_state": [k for k in keys if k.endswith("_extra_state")],
            "optimizer_norm_keys": [k for k in keys if "optimizer" in k and "norm" in k],
            "format_version": meta.get("format_version"), "layer_spec": meta.get("layer_spec")}


def state_of(bundle) -> dict:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(bundle.models)
            for k, v in m.state_dict().items() if not k.endswith("_extra_state")}


def logits_of(bundle, hf: Path) -> dict:
    from mvlm.convert.verify import make_inputs, mcore_forward

    out = {}
    for name, batch in make_inputs(bundle, hf, 1)[:2]:
        out[name] = mcore_forward(bundle, {k: v for k, v in batch.items() if k != "labels"})
    return out


def compare(ref_state, ref_logits, bundle, hf) -> dict:
    st = state_of(bundle)
    assert sorted(st) == sorted(ref_state), sorted(set(st) ^ set(ref_state))
    unequal = [k for k in st if not torch.equal(st[k], ref_state[k])]
    dmax = max(float((st[k] - ref_state[k]).abs().max()) if st[k].numel() else 0.0 for k in st)
    lg = logits_of(bundle, hf)
    dlog = max(float((lg[n] - ref_logits[n]).abs().max()) for n in ref_logits)
    exact = all(torch.equal(lg[n], ref_logits[n]) for n in ref_logits)
    return {"tensors": len(st), "unequal": unequal, "max_abs_weight": dmax,
            "max_abs_logits": dlog, "logits_equal": exact}


def expect_error(fn) -> str:
    from mvlm.convert.ckpt_format import CheckpointFormatError

    try:
        fn()
    except CheckpointFormatError as e:
        return str(e)
    return "NO ERROR"


def check_family(family: str, hf: Path, root: Path) -> dict:
    from mvlm.convert.mcore_ckpt import load_mcore, load_model_weights, save_mcore
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout

    res: dict = {}
    save_layout = ParallelLayout()
    bundle = build_from_hf(hf, save_layout)
    moe = bool(bundle.config.num_moe_experts)
    save_mcore(bundle, root / "new", save_layout, hf_src=hf, overwrite=True)
    save_te_sim(bundle, root / "te", root / "new", moe)
    save_te_sim(bundle, root / "te_bad", root / "new", moe, extra_tensor=True)
    save_te_sim(bundle, root / "te_v1", root / "new", moe)  # format 1 written by TE
    copy_meta(root / "te_v1", root / "te_v1", format_version=None, layer_spec=None)
    with keys_map_disabled(bundle):
        save_mcore(bundle, root / "old", save_layout, hf_src=hf, overwrite=True)
    copy_meta(root / "old", root / "old", format_version=None, layer_spec=None)
    if rank0():
        res["facts"] = {n: ckpt_facts(root / n) for n in ("new", "te", "old")}
    del bundle

    load_layout = ParallelLayout(ep=2) if moe else ParallelLayout(tp=2)
    ref = build_from_hf(hf, load_layout)
    ref_state, ref_logits = state_of(ref), logits_of(ref, hf)
    for name in ("new", "te", "old", "te_v1"):
        b, _ = load_mcore(root / name, load_layout, device="cpu", dtype=None)
        res[f"load_{name}"] = compare(ref_state, ref_logits, b, hf)
        del b
    # A model whose norms have _extra_state (TE's) reading the local-spec checkpoint.
    b = build_model(ref.hf_config, load_layout, dtype=torch.float32, device="cpu",
                    backend="local", perform_initialization=False,
                    vocab_padded=ref.vocab_padded)
    with te_like_norms(b) as norms:
        load_model_weights(b, root / "new")
        res["te_reader"] = compare(ref_state, ref_logits, b, hf)
        res["te_reader"]["norms_with_extra_state"] = len(norms)
        res["te_reader"]["extra_state_set"] = sum(hasattr(n, "extra_loaded") for n in norms)
    del b
    res["err_unused_tensor"] = expect_error(
        lambda: load_mcore(root / "te_bad", load_layout, device="cpu", dtype=None))
    b = build_model(ref.hf_config, load_layout, dtype=torch.float32, device="cpu",
                    backend="local", perform_initialization=False,
                    vocab_padded=ref.vocab_padded)
    fn = b.models[0].language_model.decoder.final_layernorm
    fn.register_parameter("bias", torch.nn.Parameter(torch.zeros_like(fn.weight)))
    res["err_missing_tensor"] = expect_error(lambda: load_model_weights(b, root / "new"))
    return res


@contextlib.contextmanager
def legacy_writer():
    """Training code as before the change: local spec without the TE keys map."""
    from mvlm.models import spec

    orig = spec.te_checkpoint_keys_map
    spec.te_checkpoint_keys_map = lambda is_moe: {}
    try:
        yield
    finally:
        spec.te_checkpoint_keys_map = orig


@contextlib.contextmanager
def te_like_training_norms():
    """Models built while this is active have TE's separate norms carry ``_extra_state``."""
    from mvlm.models import vlm

    orig = vlm.build_model
    cls = make_te_like_norm_class()

    def build_model(*a, **kw):
        bundle = orig(*a, **kw)
        for n in te_norms(bundle):
            n.__class__ = cls
        return bundle

    vlm.build_model = build_model
    try:
        yield
    finally:
        vlm.build_model = orig


def check_training(runs: dict) -> dict:
    from mvlm.train.trainer import run_training

    res = {}
    assert run_training(runs["ref"]) == 0
    for name, writer in (("legacy", legacy_writer), ("te_like", te_like_training_norms)):
        with writer():
            assert run_training(runs[name] + ["--exit_interval", "2"]) == 0
        ck = Path(runs[name][runs[name].index("--output_dir") + 1]) / "checkpoint-2"
        if name == "legacy":
            copy_meta(ck, ck, format_version=None, layer_spec=None)
        if rank0():
            res[f"{name}_facts"] = ckpt_facts(ck)
        dist.barrier()
        assert run_training(runs[name]) == 0
    return res


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    with worker_process_group():
        results = {}
        for family, hf in spec["families"].items():
            results[family] = check_family(family, Path(hf), Path(spec["root"]) / family)
            drop_groups()  # the family's layout groups: torch keeps them past Megatron's reset
        results["train"] = check_training(spec["train"])
        if rank0():
            Path(spec["results"]).write_text(json.dumps(results, indent=1, default=str))
            print("WORKER OK", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
