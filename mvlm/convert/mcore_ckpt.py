"""Megatron-Core ``torch_dist`` checkpoints of an mvlm model, self-describing and atomic.

Layout of a checkpoint directory::

    MCORE_DIR/
      mvlm_meta.json     model_type, HF config, padded vocab, layout it was saved at, dtype,
                         format_version and the layer spec (te/local) that wrote it
      hf/                the HF non-weight files (config, tokenizer, processor, chat template)
      model/             Megatron-Core dist_checkpointing (torch_dist) of the model

Because ``torch_dist`` stores global tensors with their shard layout, the checkpoint loads at
any TP/PP/EP (the padded vocabulary size is fixed at save time and reused on load), and its
keys are Transformer Engine's whichever spec wrote it, so it loads under either spec
(``mvlm.convert.ckpt_format``: key names, format versions, TE ``_extra_state``).
Everything is written into a hidden staging directory next to the target and renamed into
place only after every rank finished, so an interrupted save leaves no directory that looks
complete.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from transformers import AutoConfig

from mvlm.convert.ckpt_format import (
    adapt_model_keys,
    format_meta,
    format_version,
    load_module_state,
    load_sharded,
)
from mvlm.convert.dcp_load import MappedReads
from mvlm.convert.dcp_save import InProcessTorchDistSave
from mvlm.convert.hf_io import copy_aux_files
from mvlm.convert.publish import fault_point, staged_publish
from mvlm.models.vlm import ModelBundle, build_model
from mvlm.runtime.parallel import ParallelLayout

META = "mvlm_meta.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if name is None:
        return default
    if name not in _DTYPES:
        raise ValueError(f"--torch_dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def model_sharded_state_dict(bundle: ModelBundle) -> dict:
    if len(bundle.models) == 1:
        return {"model": bundle.models[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(bundle.models)}


def is_mcore_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META).exists()


def save_mcore(bundle: ModelBundle, out: Path, layout: ParallelLayout, hf_src: Path | None,
               overwrite: bool = False, extra_meta: dict | None = None) -> None:
    """Collective. Writes MCORE_DIR atomically (staging dir + rename by rank 0)."""
    with staged_publish(out, overwrite=overwrite) as staging:
        (staging / "model").mkdir(exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(model_sharded_state_dict(bundle), str(staging / "model"),
                                sharded_strategy=InProcessTorchDistSave())
        fault_point("mid_write", staging)  # tests: weights on disk, metadata not yet
        if dist.get_rank() == 0:
            meta = {
                "format": "mvlm-mcore-v1",
                "model_type": bundle.hf_config.model_type,
                "hf_config": bundle.hf_config.to_dict(),
                "vocab_padded": bundle.vocab_padded,
                "saved_layout": asdict(layout),
                "dtype": dtype_name(bundle.config.params_dtype),
                **format_meta(bundle.backend),
                **(extra_meta or {}),
            }
            (staging / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            hf_dir = staging / "hf"
            hf_dir.mkdir()
            if hf_src is not None:
                copy_aux_files(Path(hf_src), hf_dir)
            bundle.hf_config.save_pretrained(hf_dir)


def read_meta(path: Path) -> dict:
    p = Path(path) / META
    if not p.exists():
        raise FileNotFoundError(
            f"{path} is not an mvlm Megatron checkpoint (no {META}); pass an HF directory with "
            "--to mcore, or a directory written by `mvlm convert --to mcore`")
    meta = json.loads(p.read_text())
    format_version(meta, Path(path))  # a checkpoint from a newer mvlm fails here, clearly
    return meta


def model_keys(bundle: ModelBundle) -> list[str]:
    """The top-level keys of :func:`model_sharded_state_dict`, in model-chunk order."""
    return ["model"] if len(bundle.models) == 1 else [f"model{i}" for i in
                                                       range(len(bundle.models))]


def load_model_weights(bundle: ModelBundle, path: Path, meta: dict | None = None,
                       map_params: bool = False) -> dict:
    """Collective: load the model weights of an mvlm checkpoint (convert or training) into
    ``bundle``, whichever layer spec and layout wrote it. Optimizer state is left unread.

    ``map_params``: a CPU parameter that is one contiguous byte range of a stored shard (every
    parameter of a checkpoint loaded at its saved layout, row shards at another TP) becomes a
    copy-on-write memory map of that range instead of being read into fresh memory (for a
    converter that only passes the weights on: no allocation, no copy, and the HF writer can
    copy the bytes file to file, ``mvlm.convert.file_maps``). Writing to such a parameter
    changes this process's pages only, never the checkpoint."""
    path = Path(path)
    meta = meta if meta is not None else read_meta(path)
    sd = model_sharded_state_dict(bundle)
    adapt_model_keys(sd, path / "model", meta)
    maps = MappedReads(_plain_param_tensors(bundle, sd)) if map_params else None
    loaded = load_sharded(sd, path / "model", with_optimizer=False, deferred=maps)
    for k, m in zip(model_keys(bundle), bundle.models, strict=True):
        load_module_state(m, loaded[k], strict=True)
    if maps is not None:
        for m in bundle.models:
            for p in m.parameters():
                view = maps.swaps.pop((p.data_ptr(), p.dtype, tuple(p.shape)), None)
                if view is not None:
                    p.data = view
        if maps.swaps:  # a mapped destination that is no parameter's data: never left unread
            raise RuntimeError(f"{len(maps.swaps)} mapped checkpoint regions have no parameter")
    return meta


def _plain_param_tensors(bundle: ModelBundle, sd: dict) -> list[torch.Tensor]:
    """The whole data of every parameter that ``sd`` loads as a plain ShardedTensor (no
    factory): what :class:`~mvlm.convert.dcp_load.MappedReads` may map instead of read."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    params = {(p.data_ptr(), p.dtype, tuple(p.shape)) for m in bundle.models
              for p in m.parameters()}
    return [v.data for v in nested_values(sd) if type(v) is ShardedTensor
            and v.data is not None and (v.data.data_ptr(), v.data.dtype,
                                        tuple(v.data.shape)) in params]


def load_mcore(path: Path, layout: ParallelLayout, *, device: str, dtype: torch.dtype | None,
               backend: str = "local", map_params: bool = False,
               **build_kw) -> tuple[ModelBundle, dict]:
    """Build the model at ``layout`` (may differ from the saved one) and load the weights;
    ``backend`` may differ from the ``layer_spec`` that wrote the checkpoint; ``map_params``:
    see :func:`load_model_weights`."""
    path = Path(path)
    meta = read_meta(path)
    hf_config = AutoConfig.from_pretrained(path / "hf")
    dtype = dtype or dtype_from_name(meta.get("dtype"))
    bundle = build_model(hf_config, layout, dtype=dtype, device=device, backend=backend,
                         perform_initialization=False, vocab_padded=meta["vocab_padded"],
                         **build_kw)
    load_model_weights(bundle, path, meta, map_params=map_params)
    return bundle, meta
