"""Adapters on a whole mvlm model: configuration, target resolution, apply, merge, state.

Target names are resolved against *global* Megatron module names (``decoder.layers.3.mlp.
linear_fc1``, layer index after the pipeline offset, expert index after the EP offset) so that a
rule means the same thing at every layout. HF names map onto the fused Megatron modules
(q/k/v_proj -> linear_qkv, gate/up_proj -> linear_fc1, o_proj -> linear_proj, down_proj ->
linear_fc2); vision-tower linears keep their HF names.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from mvlm.models.vlm import ModelBundle
from mvlm.tuners.layers import LoRAAdapter, attach, describe_linear

log = logging.getLogger("mvlm.tuners")

#: Name of the container each model chunk keeps its adapters in (a sibling of language_model,
#: so base parameter names are untouched). The converters skip parameters under it.
ADAPTER_ATTR = "mvlm_adapters"

HF_TO_MCORE = {
    "q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv",
    "o_proj": "linear_proj", "gate_proj": "linear_fc1", "up_proj": "linear_fc1",
    "down_proj": "linear_fc2",
}
MCORE_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
ALL_LINEAR = ("all-linear", "all", "ALL")
SAVE_ALIASES = {
    "embed_tokens": "embedding.word_embeddings", "embedding": "embedding.word_embeddings",
    "word_embeddings": "embedding.word_embeddings", "lm_head": "output_layer",
    "output_layer": "output_layer", "router": "mlp.router",
}


@dataclass
class AdapterConfig:
    """What to adapt and how (ms-swift flag names in comments)."""

    kind: str = "lora"  # "lora" | "dora" (--train_type)
    rank: int = 8  # --lora_rank
    alpha: float = 32.0  # --lora_alpha
    dropout: float = 0.0  # --lora_dropout
    use_rslora: bool = False  # --use_rslora: scale alpha/sqrt(r) instead of alpha/r
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    target_regex: str | None = None  # full match on the global module name
    modules_to_save: list[str] = field(default_factory=list)
    include_vision: bool = False  # adapt vision-tower linears too (when the ViT is not frozen)
    seed: int = 42
    b_init_std: float = 0.0  # tests: non-zero B so adapters matter from the first step

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "dora"):
            raise ValueError(f"adapter kind {self.kind!r}: use lora or dora")
        if self.rank <= 0:
            raise ValueError(f"--lora_rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.dropout}")


@dataclass
class AdapterReport:
    """Counts over the whole model (all ranks, one copy of each replicated tensor)."""

    n_adapters: int
    trainable: int
    total: int
    targets: list[str]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f} ({self.n_adapters} adapted linears)")


#: Entry of each chunk's checkpoint state that describes the adapter run (see set_run_record).
RUN_RECORD_KEY = "run"
#: Version of the run record; readers refuse versions they do not know.
RUN_RECORD_VERSION = 1


class AdapterStore(nn.Module):
    """The adapters of one model chunk, keyed by global module name ('.' -> '-').

    Besides the tensors, the checkpoint holds ``run_record`` (a plain dict, so Megatron-Core
    stores it in the checkpoint's common state): the adapter configuration and the base model of
    the run. Adapter checkpoints hold no base weights, so this is what lets ``mvlm export
    --merge_lora`` rebuild the model from the checkpoint alone."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.handles: list = []
        self.run_record: dict | None = None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """Checkpoint entries with global keys and the right TP/EP sharding per tensor.

        Rows of a gated fc1 (lora_B, DoRA magnitude: [gate_r; up_r] on each TP rank) are stored via
        Megatron-Core's SwiGLU factory (gate and up halves sharded separately) under their own
        ``*_gate_up`` keys, so the stored tensor is [gate; up] whatever TP wrote it and reloads
        correctly at any TP (a plain row split would interleave the halves of each rank)."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        out: dict = {}
        if self.run_record is not None:
            out[f"{prefix}{RUN_RECORD_KEY}"] = dict(self.run_record)
        for key, ad in self.adapters.items():
            spec = ad.spec
            if spec.expert:
                dp_rank = ps.get_expert_data_parallel_rank()
                tp_rank = ps.get_expert_tensor_parallel_rank()
            else:
                dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
                tp_rank = ps.get_tensor_model_parallel_rank()  # also for replicated ViT linears
            for pname, p in ad.named_parameters():
                full_key = f"{prefix}adapters.{key}.{pname}"
                dim = getattr(p, "partition_dim", None) if getattr(
                    p, "tensor_model_parallel", False) else None
                if getattr(ad, "gate_up", False) and pname in ("lora_B", "lora_magnitude"):
                    # rows of a fused [gate; up]: at every TP (also 1) through the factory
                    sh = ShardedTensor.from_rank_offsets(
                        f"mvlm_adapters.{ad.global_name}.{pname}_gate_up", p,
                        (0, spec.tp_rank, spec.tp_size), replica_id=(0, 0, dp_rank))
                    out[full_key] = apply_swiglu_sharded_factory(sh, ())
                elif dim is None:
                    out[full_key] = ShardedTensor.from_rank_offsets(
                        f"mvlm_adapters.{ad.global_name}.{pname}", p,
                        replica_id=(tp_rank, 0, dp_rank))
                else:
                    out[full_key] = ShardedTensor.from_rank_offsets(
                        f"mvlm_adapters.{ad.global_name}.{pname}", p,
                        (dim, spec.tp_rank, spec.tp_size), replica_id=(0, 0, dp_rank))
        return out


def is_adapter_param(name: str) -> bool:
    """True for parameter names that belong to adapters (for converters and exporters)."""
    return name.startswith(ADAPTER_ATTR + ".") or ("." + ADAPTER_ATTR + ".") in name


def _global_module_names(bundle: ModelBundle):
    """(chunk, local module name, global module name, module) for every module of every chunk."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from mvlm.convert.bridge import global_param_name

    n_exp = bundle.arch.num_experts or 0
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep = parallel_state.get_expert_model_parallel_world_size()
    expert_offset = ep_rank * (n_exp // ep) if n_exp else 0
    for vp, model in enumerate(bundle.models):
        offset = get_transformer_layer_offset(
            bundle.config, vp_stage=vp if len(bundle.models) > 1 else None)
        for lname, mod in model.named_modules():
            if not lname or lname.split(".")[0] == ADAPTER_ATTR:
                continue
            gname = global_param_name(lname + ".weight", offset, expert_offset)[: -len(".weight")]
            yield model, lname, gname, mod


def _wanted(gname: str, cfg: AdapterConfig) -> bool:
    is_vision = gname.startswith("vision_model.")
    if is_vision and not cfg.include_vision:
        return False
    if gname.endswith("output_layer"):
        return False  # like peft's all-linear: never the output head (use modules_to_save)
    if cfg.target_regex and re.fullmatch(cfg.target_regex, gname):
        return True
    last = gname.rsplit(".", 1)[-1]
    for t in cfg.target_modules:
        if t in ALL_LINEAR:
            return True
        if t == "router":
            continue  # routers are trained whole (modules_to_save), not adapted
        if HF_TO_MCORE.get(t, t) == last and not is_vision:
            return True
        if is_vision and (t == last or gname.endswith("." + t)):
            return True
        if "." in t and gname.endswith("." + t):
            return True
    return False


def _set_parent(model: nn.Module, store: AdapterStore) -> None:
    if not hasattr(model, ADAPTER_ATTR):
        model.add_module(ADAPTER_ATTR, store)


def apply_adapters(bundle: ModelBundle, cfg: AdapterConfig,
                   freeze_base: bool = True) -> AdapterReport:
    """Attach adapters to the targeted linears of every chunk; freeze the base (optional).

    Call after the base weights are loaded (DoRA's magnitude starts at the weight's row norms)
    and before DDP / optimizer construction (they must see the new trainable parameters).
    ``freeze_base=False`` leaves requires_grad of base parameters as the caller set it
    (``--train_type lora_llm``: the vision tower follows the freeze flags).
    """
    unknown = [t for t in cfg.target_modules if t not in ALL_LINEAR and t not in HF_TO_MCORE
               and t not in MCORE_LINEARS and t != "router" and not cfg.include_vision
               and "." not in t]
    if unknown:
        raise ValueError(f"--target_modules {unknown}: not a known module name. Use all-linear, "
                         f"Megatron names {list(MCORE_LINEARS)}, HF names {list(HF_TO_MCORE)}, "
                         "or --target_regex on Megatron module names "
                         "(e.g. 'decoder\\.layers\\.\\d+\\.self_attention\\.linear_qkv')")
    targets: list[str] = []
    if freeze_base:
        for m in bundle.models:
            for p in m.parameters():
                p.requires_grad_(False)
    save = [SAVE_ALIASES.get(s, s) for s in cfg.modules_to_save]
    if "router" in cfg.target_modules:
        save.append("mlp.router")
    for model, _lname, gname, mod in list(_global_module_names(bundle)):
        if any(gname == s or gname.endswith("." + s) for s in save):
            for p in mod.parameters(recurse=True):
                p.requires_grad_(True)
            continue
        if not isinstance(mod, nn.Module) or not _wanted(gname, cfg):
            continue
        spec = describe_linear(mod)
        if spec is None:
            continue
        store = getattr(model, ADAPTER_ATTR, None)
        if store is None:
            store = AdapterStore()
            _set_parent(model, store)
        key = gname.replace(".", "-")
        if key in store.adapters:
            continue
        to_local = _column_splitter(bundle, gname) if spec.kind == "column" and \
            spec.tp_size > 1 else None
        ad = LoRAAdapter(mod, spec, gname, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                         use_rslora=cfg.use_rslora, use_dora=cfg.kind == "dora", seed=cfg.seed,
                         b_init_std=cfg.b_init_std, column_to_local=to_local)
        ad.gate_up = spec.kind == "column" and _is_gate_up(bundle, gname)
        store.adapters[key] = ad
        store.handles.append(attach(mod, ad))
        targets.append(gname)
    for model in bundle.models:  # every chunk carries the run record, adapted or not
        if getattr(model, ADAPTER_ATTR, None) is None:
            _set_parent(model, AdapterStore())
    n = torch.tensor([len(targets)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(n)
    if int(n.item()) == 0:
        raise ValueError(f"no module matched --target_modules {cfg.target_modules} / "
                         f"--target_regex {cfg.target_regex!r}: nothing to adapt")
    rep = parameter_report(bundle)
    rep.targets = targets
    return rep


class _DictReader:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.t = tensors

    def read(self, name, dim=None, start=None, stop=None):
        t = self.t[name]
        return t if dim is None else t.narrow(dim, start, stop - start)

    def shape(self, name):
        return list(self.t[name].shape)


def _column_splitter(bundle: ModelBundle, gname: str):
    """Full tensor in single-rank row order -> this rank's rows, through the weight table (so
    QKV groups and [gate_r; up_r] blocks land where the TP-sharded weight has them)."""
    from dataclasses import replace

    from mvlm.convert.bridge import shard_ctx
    from mvlm.convert.mapping import find_mapping

    try:
        m, idx = find_mapping(bundle.family.mappings(bundle.hf_config, bundle.arch),
                              gname + ".weight")
    except KeyError:
        return None
    ctx = shard_ctx(bundle, m)
    one = replace(ctx, tp_rank=0, tp_size=1)

    def split(full: torch.Tensor) -> torch.Tensor:
        return m.load(_DictReader(dict(m.to_hf(full, idx, one))), idx, ctx)

    return split


def _is_gate_up(bundle: ModelBundle, gname: str) -> bool:
    """True when the module's weight is a fused [gate; up] (SwiGLU fc1) in the weight table."""
    from mvlm.convert.mapping import GatedMLP, find_mapping

    try:
        m, _ = find_mapping(bundle.family.mappings(bundle.hf_config, bundle.arch),
                            gname + ".weight")
    except KeyError:
        return False
    return isinstance(m, GatedMLP)


def set_run_record(bundle: ModelBundle, cfg: AdapterConfig, train_type: str,
                   base_model: str | None, base_mcore_model: str | None) -> None:
    """Attach the run's description (adapter config, train type, base model as absolute paths)
    to every chunk's adapter store, so its adapter checkpoints say how to rebuild the model."""
    import os
    from dataclasses import asdict

    rec = {"version": RUN_RECORD_VERSION, "train_type": train_type, "adapter": asdict(cfg),
           "base_model": os.path.abspath(base_model) if base_model else None,
           "base_mcore_model": os.path.abspath(base_mcore_model) if base_mcore_model else None}
    for m in bundle.models:
        store = getattr(m, ADAPTER_ATTR, None)
        if store is not None:
            store.run_record = rec


def read_run_record(model_dir) -> dict | None:
    """The run record of a torch_dist checkpoint's ``model/`` dir (None if it has none).
    Reads only the checkpoint's common state (no tensors, no process group needed)."""
    from pathlib import Path

    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    f = Path(model_dir) / COMMON_STATE_FNAME
    if not f.exists():
        return None
    common = torch.load(f, map_location="cpu", weights_only=True)
    for key, chunk in sorted(common.items()):
        if key.startswith("model") and isinstance(chunk, dict):
            rec = chunk.get(f"{ADAPTER_ATTR}.{RUN_RECORD_KEY}")
            if rec is not None:
                if rec.get("version") != RUN_RECORD_VERSION:
                    raise ValueError(f"{model_dir}: adapter run record version "
                                     f"{rec.get('version')!r}; this mvlm reads "
                                     f"{RUN_RECORD_VERSION} (upgrade mvlm)")
                return rec
    return None


def adapters(bundle: ModelBundle) -> list[LoRAAdapter]:
    out: list[LoRAAdapter] = []
    for m in bundle.models:
        store = getattr(m, ADAPTER_ATTR, None)
        if store is not None:
            out.extend(store.adapters.values())
    return out


def parameter_report(bundle: ModelBundle) -> AdapterReport:
    """Trainable / total parameters of the whole model (full, unsharded sizes; every tensor once
    whatever the layout): each rank lists its tensors by global name, the lists are merged."""
    from mvlm.convert.bridge import param_entries, shard_ctx
    from mvlm.convert.stream import skip_on_export

    local: dict[str, tuple[int, bool]] = {}
    for e in param_entries(bundle):
        if skip_on_export(bundle, e):
            continue
        tp = shard_ctx(bundle, e.mapping).tp_size if e.mapping.split_dim is not None else 1
        local[e.global_name] = (e.param.numel() * tp, e.param.requires_grad)
    for ad in adapters(bundle):
        for n, p in ad.named_parameters():
            tp = ad.spec.tp_size if getattr(p, "tensor_model_parallel", False) else 1
            local[f"{ad.global_name}.{n}"] = (p.numel() * tp, p.requires_grad)
    merged = dict(local)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everything: list = [None] * dist.get_world_size()
        dist.all_gather_object(everything, local)
        for d in everything:
            merged.update(d)
    total = sum(n for n, _ in merged.values())
    trainable = sum(n for n, t in merged.values() if t)
    return AdapterReport(len(adapters(bundle)), trainable, total, [])


def adapter_state_dict(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors keyed ``<global module name>.<lora_A|lora_B|lora_magnitude>``."""
    return {f"{ad.global_name}.{n}": p.detach() for ad in adapters(bundle)
            for n, p in ad.named_parameters()}


def merge_adapters(bundle: ModelBundle) -> None:
    """Fold every adapter into its base weight (fp32 math, cast back); forward is unchanged."""
    for ad in adapters(bundle):
        ad.merge()


def unmerge_adapters(bundle: ModelBundle) -> None:
    """Restore the exact base weights saved by merge_adapters (training can continue)."""
    for ad in adapters(bundle):
        ad.unmerge()
