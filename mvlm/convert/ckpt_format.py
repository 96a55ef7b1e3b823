"""Checkpoint key names and format versions: one ``torch_dist`` layout for both layer specs.

Format versions (``format_version`` in ``mvlm_meta.json``):

1 (field absent): written before this module existed. Keys were the names of whichever spec
  wrote the checkpoint: the local spec's ``layers.input_layernorm.weight`` /
  ``layers.pre_mlp_layernorm.weight``, or TE's fused names. Read by renaming, per key, the TE
  name the model asks for to the old local name when only the latter is in the checkpoint.
2: keys are Transformer Engine's under both specs (the local spec maps its norms through
  ``sharded_state_dict_keys_map``, see ``mvlm.models.spec.te_checkpoint_keys_map``);
  ``layer_spec`` records which spec (``te`` or ``local``) wrote it.

TE modules also checkpoint ``_extra_state`` entries (fp8 scaling metadata) that the local
spec's norms and attention do not have, and the local linears store an empty one that TE reads as
"no fp8 state". Loads therefore go through Megatron-Core's ``StrictHandling.RETURN_ALL`` and
tolerate exactly one kind of mismatch, ``_extra_state``, in either direction; any other missing or
unused tensor is an error that names the keys.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

log = logging.getLogger("mvlm.convert")

FORMAT_VERSION = 2
LAYER_SPECS = ("te", "local")

_EXTRA_STATE_RX = re.compile(r"(^|\.)_extra_state\d*$")
_OPTIMIZER_RX = re.compile(r"^(chained_\d+\.)?optimizer\.")
# v1 local-spec names of the norms that TE fuses into the following linear (TE name -> old name).
_LEGACY_NORM_KEYS = (
    (re.compile(r"(^|\.)layers\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$"),
     r"\1layers.input_layernorm.\2"),
    (re.compile(r"(^|\.)layers\.mlp\.linear_fc1\.layer_norm_(weight|bias)$"),
     r"\1layers.pre_mlp_layernorm.\2"),
)


class CheckpointFormatError(ValueError):
    """A checkpoint this mvlm cannot map onto the model; the message names keys and the fix."""


def format_meta(layer_spec: str) -> dict:
    """The ``mvlm_meta.json`` fields that describe the key layout of a checkpoint written now."""
    if layer_spec not in LAYER_SPECS:
        raise ValueError(f"layer spec must be one of {LAYER_SPECS}, got {layer_spec!r}")
    return {"format_version": FORMAT_VERSION, "layer_spec": layer_spec}


def format_version(meta: dict, path: Path) -> int:
    """The checkpoint's format version (1 when absent); a newer one than this mvlm is refused."""
    v = meta.get("format_version", 1)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}/mvlm_meta.json has format_version={v!r}; this mvlm reads versions 1 to "
            f"{FORMAT_VERSION}. A newer mvlm wrote it: upgrade mvlm to load it.")
    return v


def is_extra_state(key: str) -> bool:
    return bool(_EXTRA_STATE_RX.search(key))


def _sharded_entries(sharded_sd: dict):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    for v in nested_values(sharded_sd):
        if isinstance(v, (ShardedTensor, ShardedObject, ShardedTensorFactory)):
            yield v


def checkpoint_keys(model_dir: Path) -> set[str]:
    """Keys of every tensor and object stored in a ``torch_dist`` directory (metadata only)."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return {sh.key for sh in load_sharded_metadata(str(model_dir)).values()}


def legacy_key(key: str) -> str | None:
    """The format-1 local-spec name of a TE norm key, or None if ``key`` is not one."""
    for rx, repl in _LEGACY_NORM_KEYS:
        if rx.search(key):
            return rx.sub(repl, key)
    return None


def adapt_model_keys(model_sd: dict, model_dir: Path, meta: dict) -> int:
    """Rename, in place, the model's requested keys to the names the checkpoint stores them under.

    Call on the model part of the sharded state dict *before* building the optimizer's from it:
    optimizer keys embed the model keys, so they follow. Only format-1 checkpoints can differ;
    a key is renamed only when its TE name is absent and its old local name present, so a
    format-1 checkpoint that TE wrote (TE names already) is read as it is. Returns the count."""
    if format_version(meta, model_dir.parent) >= 2:
        return 0
    stored = checkpoint_keys(model_dir)
    renamed = 0
    for sh in _sharded_entries(model_sd):
        old = legacy_key(sh.key)
        if old is not None and sh.key not in stored and old in stored:
            sh.key = old
            renamed += 1
    if renamed and _rank() == 0:
        log.info("%s: format-1 checkpoint with local-spec norm names; read %d entries under "
                 "their old names", model_dir.parent, renamed)
    return renamed


def load_sharded(sharded_sd: dict, model_dir: Path, *, with_optimizer: bool,
                 deferred=None) -> dict:
    """``dist_checkpointing.load`` that tolerates ``_extra_state`` mismatches and nothing else.

    ``deferred`` (a ``mvlm.convert.dcp_load.MappedReads``): the tensors it allows are mapped
    instead of read, for the caller to swap in.

    Requested entries the checkpoint lacks are dropped from the load by Megatron-Core
    (RETURN_ALL) and must all be ``_extra_state`` (a TE model reading a local-spec checkpoint);
    stored entries nobody requested must be ``_extra_state`` (a TE checkpoint read by the local
    spec) or, when the optimizer is not being restored, optimizer state."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    loaded, unread, absent = dist_checkpointing.load(
        sharded_sd, str(model_dir), sharded_strategy=_load_strategy(model_dir, deferred),
        strict=StrictHandling.RETURN_ALL)
    # Megatron-Core's words: "missing" = stored but requested by no rank, "unexpected" =
    # requested here but not stored.
    absent_bad = sorted(k for k in absent if not is_extra_state(k))
    if absent_bad:
        raise CheckpointFormatError(
            f"{model_dir} lacks {len(absent_bad)} entries the model needs: {_few(absent_bad)}. "
            "The checkpoint was written for a different model or configuration (compare "
            "mvlm_meta.json's hf_config with the model), or is incomplete.")
    unread_bad = sorted(k for k in unread if not is_extra_state(k)
                        and (with_optimizer or not _OPTIMIZER_RX.match(k)))
    if unread_bad:
        raise CheckpointFormatError(
            f"{model_dir} holds {len(unread_bad)} entries the model does not use: "
            f"{_few(unread_bad)}. The checkpoint was written for a different model or "
            "configuration; loading it would silently drop these weights.")
    skipped = sorted(k for k in unread | absent if is_extra_state(k))
    if skipped and _rank() == 0:
        log.info("%s: %d Transformer Engine _extra_state entries (fp8 metadata) not exchanged "
                 "between layer specs, e.g. %s", model_dir, len(skipped), skipped[0])
    return loaded


def _load_strategy(model_dir: Path, deferred=None):
    """Megatron-Core's ``torch_dist`` load reading straight into the tensors
    (``mvlm.convert.dcp_load``); None (Megatron-Core's default) for any other backend, where
    nothing is deferred."""
    from megatron.core.dist_checkpointing.core import maybe_load_config

    from mvlm.convert.dcp_load import DirectTorchDistLoad

    config = maybe_load_config(str(model_dir))
    if config is None or config.sharded_backend != "torch_dist":
        return None  # nothing is mapped: every tensor is read as Megatron-Core reads it
    return DirectTorchDistLoad(deferred)


def load_module_state(module: torch.nn.Module, state: dict, strict: bool = True) -> None:
    """``load_state_dict`` where an ``_extra_state`` the checkpoint did not have may stay unset.

    With ``strict`` every other parameter and buffer must be loaded and nothing left over;
    without it (adapter runs load trainable entries only) torch's non-strict load applies."""
    result = module.load_state_dict(state, strict=False)
    if not strict:
        return
    missing = [k for k in result.missing_keys if not is_extra_state(k)]
    if missing or result.unexpected_keys:
        raise CheckpointFormatError(
            f"checkpoint state does not match the model: missing {_few(sorted(missing))}, "
            f"unexpected {_few(sorted(result.unexpected_keys))}")


def _few(keys: list[str], n: int = 6) -> str:
    head = ", ".join(keys[:n])
    return head + (f" (+{len(keys) - n} more)" if len(keys) > n else "") if keys else "none"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
