"""PEFT-format adapter export/import and merged HF export.

The PEFT directory is what ``peft`` 0.21 itself writes for the HF model class: adapter_config.json
(written by ``peft.LoraConfig.save_pretrained`` when peft is installed) and
adapter_model.safetensors with keys ``base_model.model.<HF module path>.lora_A.weight`` /
``lora_B.weight`` / ``lora_magnitude_vector`` (DoRA), plus ``base_model.model.<HF param>`` for
modules_to_save. Fused Megatron adapters are split back per HF module with the family's weight
table, the same primitives the weight converter uses:

* linear_qkv: A is shared by q/k/v, so each of q_proj/k_proj/v_proj gets a copy of A and its rows
  of B (de-interleaved per query group exactly like the fused weight); same for the DoRA
  magnitude (one entry per output row).
* linear_fc1: gate_proj/up_proj get A and their halves of B ([gate_r; up_r] per TP rank).
* row-parallel layers: A is gathered along the input dim, B is whole.

Loading reverses it with the table's ``load`` (each rank reads only its slice).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from mvlm.models.vlm import ModelBundle
from mvlm.tuners.layers import LoRAAdapter
from mvlm.tuners.model import AdapterConfig, adapters, merge_adapters, unmerge_adapters

log = logging.getLogger("mvlm.tuners")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def hf_module_path(bundle: ModelBundle, disk_name: str) -> str:
    """HF hub-layout tensor/module name -> module path in the transformers model (peft keys follow
    the module tree, e.g. Qwen-VL's decoder is model.language_model): the family's
    ``peft_module_path``."""
    return bundle.family.peft_module_path(disk_name)


def _mapping_for(bundle: ModelBundle, ad: LoRAAdapter):
    from mvlm.convert.bridge import shard_ctx
    from mvlm.convert.mapping import find_mapping

    table = bundle.family.mappings(bundle.hf_config, bundle.arch)
    m, idx = find_mapping(table, ad.global_name + ".weight")
    return m, idx, shard_ctx(bundle, m)


def _gather(t: torch.Tensor, dim: int, ad: LoRAAdapter) -> torch.Tensor:
    """The whole adapter matrix from its TP shards (the converter's one TP gather)."""
    from mvlm.convert.stream import gather_tp

    return gather_tp(t, dim, ad.spec.tp_size, ad.spec.tp_group)[0]


def _writer(ad: LoRAAdapter) -> bool:
    """One rank writes each adapter: TP rank 0 of one data-parallel (and CP) replica."""
    from megatron.core import parallel_state as ps

    if ad.spec.expert:
        dp0 = ps.get_expert_data_parallel_rank() == 0
        tp0 = ps.get_expert_tensor_parallel_rank() == 0
    else:
        dp0 = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
        tp0 = ps.get_tensor_model_parallel_rank() == 0  # replicated ViT linears too
    return dp0 and tp0


@torch.no_grad()
def peft_tensors(bundle: ModelBundle, dtype: torch.dtype | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Collective: every adapter (and trainable base tensor = modules_to_save) in peft keys,
    gathered on global rank 0 (empty elsewhere); also the names needed for the config."""
    from mvlm.convert.stream import iter_hf_tensors

    local: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    for ad in adapters(bundle):
        m, idx, ctx = _mapping_for(bundle, ad)
        col = ad.spec.kind == "column"
        a = _gather(ad.lora_A, 1, ad) if ad.spec.kind == "row" else ad.lora_A.detach()
        b = _gather(ad.lora_B, 0, ad) if col else ad.lora_B.detach()
        mag = None
        if ad.lora_magnitude is not None:
            mag = _gather(ad.lora_magnitude, 0, ad) if col else ad.lora_magnitude.detach()
        if not _writer(ad):
            continue
        b_parts = m.to_hf(b, idx, ctx)
        mag_parts = m.to_hf(mag, idx, ctx) if mag is not None else [(n, None) for n, _ in b_parts]
        for (name, bp), (_, mp) in zip(b_parts, mag_parts, strict=True):
            path = hf_module_path(bundle, name[: -len(".weight")])
            modules.add(path)
            local[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.clone()
            local[f"{PEFT_PREFIX}{path}.lora_B.weight"] = bp.clone()
            if mp is not None:
                local[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = mp.clone()
    saved: set[str] = set()
    # modules_to_save: the trainable base tensors, streamed like the HF export (same gather,
    # same replica and tied-embedding rules); what this rank leads arrives here.
    for name, tensor in iter_hf_tensors(bundle, select=lambda e: e.param.requires_grad):
        path = hf_module_path(bundle, name)
        local[PEFT_PREFIX + path] = tensor.clone()
        saved.add(path.rsplit(".", 2)[-2])
    if dtype is not None:
        local = {k: v.to(dtype) for k, v in local.items()}
    gathered: list = [None] * dist.get_world_size()
    dist.gather_object((local, sorted(modules), sorted(saved)), gathered if dist.get_rank() == 0
                       else None, dst=0)
    if dist.get_rank() != 0:
        return {}, {}
    out: dict[str, torch.Tensor] = {}
    mods: set[str] = set()
    to_save: set[str] = set()
    for t, ms, ss in gathered:
        out.update(t)
        mods.update(ms)
        to_save.update(ss)
    names = {"modules": sorted(mods), "modules_to_save": sorted(to_save)}
    for hook in _table_hooks(bundle, "post_peft_export"):  # e.g. fused MoE experts
        out, names = hook(out, names)
    return out, names


def _table_hooks(bundle: ModelBundle, attr: str) -> list[Callable]:
    """The distinct ``attr`` hooks of the family's weight table (peft layouts that differ from
    one adapter per HF module, e.g. Qwen3-VL-MoE's fused experts)."""
    table = bundle.family.mappings(bundle.hf_config, bundle.arch)
    return list(dict.fromkeys(h for m in table if (h := getattr(m, attr, None)) is not None))


def _tower_prefixes(bundle: ModelBundle | None = None) -> tuple[str, ...]:
    """HF module-path prefixes of the media tower: the bundle's family's, or (reading an adapter
    directory without a model) those of every registered family."""
    if bundle is not None:
        return bundle.family.vision.peft_tower_prefixes if bundle.family.vision else ()
    from mvlm.models.registry import families

    return tuple(sorted({p for f in families() if f.vision for p in f.vision.peft_tower_prefixes}))


def _tower_part(module: str, prefixes: tuple[str, ...]) -> str | None:
    """The path of ``module`` inside the tower, or None for a decoder module."""
    for p in prefixes:
        if module.startswith(p):
            return module[len(p):]
    return None


def _target_modules(modules: list[str], tower_prefixes: tuple[str, ...] | None = None
                    ) -> list[str] | str:
    """peft matches target names as module-path suffixes. Decoder-only targets -> the usual
    short names (q_proj, ...); once the vision tower is involved its short names (qkv, proj, fc1)
    could also hit unadapted modules, so an exact full-match regex is written instead.
    ``tower_prefixes``: the family's (None: every registered family's)."""
    prefixes = _tower_prefixes() if tower_prefixes is None else tower_prefixes
    if all(_tower_part(m, prefixes) is None for m in modules):
        return sorted({m.rsplit(".", 1)[-1] for m in modules})
    import re

    return "^(" + "|".join(re.escape(m) for m in modules) + ")$"


def export_peft_adapter(bundle: ModelBundle, cfg: AdapterConfig, out_dir: str | Path,
                        base_model_dir: str | Path | None = None,
                        dtype: torch.dtype | None = None, overwrite: bool = True) -> Path | None:
    """Collective: write a peft adapter directory (rank 0 writes). Returns the path on rank 0.

    The directory appears atomically (written into a staging dir, renamed into place); an
    existing one is replaced only with ``overwrite`` (the trainer's end-of-run export always
    replaces its own ``adapter/``; ``mvlm export`` passes its --overwrite)."""
    from safetensors.torch import save_file

    from mvlm.convert.publish import fault_point, staged_publish

    out = Path(out_dir)
    # Every rank gets the same clear error for an existing dir without overwrite (the helper
    # broadcasts rank 0's check), before any tensor is gathered.
    with staged_publish(out, overwrite=overwrite) as staging:
        tensors, names = peft_tensors(bundle, dtype)
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            fault_point("mid_write", staging)  # tests: weights written, config not yet
            _write_peft_config(staging, cfg, names, base_model_dir, _tower_prefixes(bundle))
    if dist.get_rank() == 0:
        log.info("PEFT adapter (%d tensors) written to %s", len(tensors), out)
    return out if dist.get_rank() == 0 else None


def _write_peft_config(d: Path, cfg: AdapterConfig, names: dict,
                       base_model_dir: str | Path | None, tower_prefixes: tuple[str, ...]
                       ) -> None:
    conf = {
        "peft_type": "LORA", "task_type": None, "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "use_dora": cfg.kind == "dora", "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True,
        "target_modules": _target_modules(names["modules"], tower_prefixes),
        "target_parameters": names.get("parameters") or None,
        "modules_to_save": names["modules_to_save"] or None,
        "base_model_name_or_path": str(base_model_dir) if base_model_dir else None,
        "inference_mode": True,
    }
    try:  # let peft itself write its config (all its current fields and peft_version)
        from peft import LoraConfig

        LoraConfig(**{k: v for k, v in conf.items() if k != "peft_type"}
                   ).save_pretrained(str(d))
    except ImportError:
        (d / ADAPTER_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")


def adapter_config_from_peft(adapter_dir: str | Path, **overrides) -> AdapterConfig:
    """An AdapterConfig that recreates the adapters described by a peft adapter directory."""
    d = Path(adapter_dir)
    conf = json.loads((d / ADAPTER_CONFIG).read_text())
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{d}: peft_type {conf.get('peft_type')!r}; only LORA adapters load")
    from safetensors import safe_open

    with safe_open(str(d / ADAPTER_WEIGHTS), "pt") as f:
        keys = list(f.keys())
    mods = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k})
    last = {m.rsplit(".", 1)[-1] for m in mods}
    prefixes = _tower_prefixes()
    tower = [t for t in (_tower_part(m, prefixes) for m in mods) if t is not None]
    vision = bool(tower)
    targets = sorted(x for x in last if x in ("q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"))
    vis_names = sorted({t.split(".", 2)[-1] for t in tower})
    fused = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    targets = sorted(set(targets) | {t for p in conf.get("target_parameters") or []
                                     for t in fused.get(p.rsplit(".", 1)[-1], ())})
    save = [k[len(PEFT_PREFIX):].rsplit(".", 2)[-2] for k in keys if ".lora_" not in k]
    kw = dict(kind="dora" if conf.get("use_dora") else "lora", rank=int(conf["r"]),
              alpha=float(conf["lora_alpha"]), dropout=float(conf.get("lora_dropout") or 0.0),
              use_rslora=bool(conf.get("use_rslora")), target_modules=targets + vis_names,
              modules_to_save=sorted(set(save)), include_vision=vision)
    kw.update(overrides)
    return AdapterConfig(**kw)


class _PeftReader:
    """Serves peft tensors under the HF weight names the mapping table asks for."""

    def __init__(self, bundle: ModelBundle, tensors: dict[str, torch.Tensor], suffix: str):
        self.bundle, self.t, self.suffix = bundle, tensors, suffix

    def key(self, name: str) -> str:
        mod = hf_module_path(self.bundle, name[: -len(".weight")])
        return f"{PEFT_PREFIX}{mod}.{self.suffix}"

    def __contains__(self, name: str) -> bool:
        return self.key(name) in self.t

    def read(self, name, dim=None, start=None, stop=None):
        t = self.t[self.key(name)]
        return t if dim is None else t.narrow(dim, start, stop - start)

    def shape(self, name):
        return list(self.t[self.key(name)].shape)


@torch.no_grad()
def load_peft_adapter(bundle: ModelBundle, adapter_dir: str | Path) -> int:
    """Copy a peft adapter directory into this model's (already applied) adapters; each rank
    reads only its slices. Returns the number of adapters filled; raises on any gap."""
    from safetensors.torch import load_file

    from mvlm.convert.bridge import param_entries, shard_ctx

    d = Path(adapter_dir)
    tensors = load_file(str(d / ADAPTER_WEIGHTS))
    conf = json.loads((d / ADAPTER_CONFIG).read_text())
    for hook in _table_hooks(bundle, "pre_peft_load"):
        tensors = hook(tensors, conf)
    used: set[str] = set()
    n = 0
    for ad in adapters(bundle):
        m, idx, ctx = _mapping_for(bundle, ad)
        # a fused hub tensor (MoE experts) is adapted per piece: its own names and slicing
        names = m.peft_names(idx) if hasattr(m, "peft_names") else m.hf_names(idx)
        load = m.peft_load if hasattr(m, "peft_load") else m.load
        ra = _PeftReader(bundle, tensors, "lora_A.weight")
        rb = _PeftReader(bundle, tensors, "lora_B.weight")
        missing = [nm for nm in names if nm not in ra or nm not in rb]
        if missing:
            raise KeyError(f"{d}: no adapter for {missing} (Megatron {ad.global_name}): the "
                           "adapter directory does not cover the targeted modules; match "
                           "--target_modules to it")
        a_all = [ra.read(nm) for nm in names]
        if ad.spec.kind == "row":
            a = load(ra, idx, ctx)
        else:
            if any(not torch.equal(a_all[0], x) for x in a_all[1:]):
                raise ValueError(f"{d}: {names} have different lora_A; mvlm's fused "
                                 f"{ad.global_name} shares one A (train q/k/v or gate/up "
                                 "adapters with mvlm, or merge this adapter instead)")
            a = a_all[0]
        b = load(rb, idx, ctx) if ad.spec.kind == "column" else rb.read(names[0])
        for p, t in ((ad.lora_A, a), (ad.lora_B, b)):
            if tuple(p.shape) != tuple(t.shape):
                raise ValueError(f"{ad.global_name}: adapter shape {tuple(t.shape)} != "
                                 f"{tuple(p.shape)} (rank mismatch? the dir has r="
                                 f"{a_all[0].shape[0]})")
            p.copy_(t.to(p.dtype))
        if ad.lora_magnitude is not None:
            rm = _PeftReader(bundle, tensors, "lora_magnitude_vector")
            mag = load(rm, idx, ctx) if ad.spec.kind == "column" else rm.read(names[0])
            ad.lora_magnitude.copy_(mag.to(ad.lora_magnitude.dtype))
            used.update(rm.key(nm) for nm in names)
        used.update(ra.key(nm) for nm in names)
        used.update(rb.key(nm) for nm in names)
        n += 1
    for e in param_entries(bundle):  # modules_to_save
        if not e.param.requires_grad:
            continue
        ctx = shard_ctx(bundle, e.mapping)

        class _Full:
            def __contains__(self, name):
                return PEFT_PREFIX + hf_module_path(bundle, name) in tensors

            def read(self, name, dim=None, start=None, stop=None):
                t = tensors[PEFT_PREFIX + hf_module_path(bundle, name)]
                return t if dim is None else t.narrow(dim, start, stop - start)

            def shape(self, name):
                return list(tensors[PEFT_PREFIX + hf_module_path(bundle, name)].shape)

        reader = _Full()
        if all(nm in reader for nm in e.mapping.hf_names(e.idx)):
            e.param.copy_(e.mapping.load(reader, e.idx, ctx).to(e.param.dtype))
            used.update(PEFT_PREFIX + hf_module_path(bundle, nm)
                        for nm in e.mapping.hf_names(e.idx))
    all_used: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_used, used)
    unused = set(tensors) - set().union(*all_used)
    if unused:
        raise KeyError(f"{d}: {len(unused)} adapter tensors match no adapted module (e.g. "
                       f"{sorted(unused)[:3]}): apply adapters with the directory's targets "
                       "(adapter_config_from_peft)")
    return n


def export_merged_hf(bundle: ModelBundle, aux_src: str | Path, out: str | Path,
                     dtype: torch.dtype | None, overwrite: bool = False,
                     max_shard_bytes: int = 5 * 2**30,
                     before_publish: Callable[[Path], None] | None = None) -> None:
    """Collective: merge adapters into the base weights (fp32 math, cast back), stream the HF
    export, then restore the exact base weights so training can go on.

    ``before_publish(staging_dir)`` runs with the adapters already unmerged again (so the model
    it sees is the adapted one, not the merged weights it just wrote): a check of the written
    files against the real adapted model; if it raises, nothing is published."""
    from mvlm.convert.command import export_to_hf

    check = None
    if before_publish is not None:
        def check(staged: Path) -> None:
            unmerge_adapters(bundle)
            before_publish(staged)

    merge_adapters(bundle)
    try:
        export_to_hf(bundle, Path(aux_src), Path(out), dtype, overwrite=overwrite,
                     max_shard_bytes=max_shard_bytes, before_publish=check)
    finally:
        unmerge_adapters(bundle)
