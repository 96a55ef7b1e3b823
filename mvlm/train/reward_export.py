"""Writing a trained reward model (``mvlm rlhf --rlhf_type rm``) in layouts transformers loads.

* A family whose text model has a ``*ForSequenceClassification`` class in transformers (Qwen2,
  Qwen3, Llama, Mistral, Gemma, ...; looked up through ``AutoModelForSequenceClassification``'s
  table for the config's ``model_type``): the exported causal-LM directory becomes that class's
  layout -- ``lm_head.weight`` is dropped, ``score.weight`` [1, hidden] added to the same shard,
  and the config gets ``architectures: [<Family>ForSequenceClassification]``, ``num_labels: 1``
  and a ``pad_token_id`` (HF pools the last non-pad token). ``AutoModelForSequenceClassification
  .from_pretrained(dir)`` then gives the reward as ``logits[:, 0]``.
* Other families (the VLMs: transformers has no sequence-classification class for them): the
  HF model is written as usual and the head goes beside it as ``value_head.safetensors``
  (``score.weight`` [1, hidden]); the reward is ``score.weight @ h`` with ``h`` the base
  model's ``last_hidden_state`` (after its final norm) at the last token.

Both write ``reward_model.json`` (``{"head": "sequence_classification" | "value_head", ...}``),
which :func:`mvlm.rl.reward_model.load_reward_model` reads.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mvlm.train.trainer import Trainer

VALUE_HEAD_FILE = "value_head.safetensors"
META_FILE = "reward_model.json"


def seq_cls_class(model_type: str) -> str | None:
    """transformers' sequence-classification class name for ``model_type`` (None if none)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)


def _gather_head(trainer: Trainer, head: torch.nn.Linear | None) -> torch.Tensor:
    """The head's weight on every rank (from a last-stage rank; all of them hold it)."""
    import torch.distributed as dist

    h = trainer.bundle.arch.hidden_size
    have = [head is not None]
    flags: list = [None] * dist.get_world_size()
    dist.all_gather_object(flags, have)
    src = next(i for i, f in enumerate(flags) if f[0])
    w = head.weight.detach().float().cpu() if head is not None else torch.zeros(1, h)
    w = w.to(trainer.device).contiguous()
    dist.broadcast(w, src=src)
    return w.cpu()


def detach_value_head(trainer: Trainer) -> Callable[[Path], None]:
    """Take the head off the model (the HF export maps Megatron parameters only) and return
    the callable that puts it back and writes it into the exported directory."""
    from mvlm.train.objectives.rm import HEAD

    model = trainer.bundle.models[-1]
    head = getattr(model, HEAD, None)
    if head is not None:
        delattr(model, HEAD)

    def after(hf_dir: Path) -> None:
        import torch.distributed as dist

        if head is not None:
            setattr(model, HEAD, head)
        w = _gather_head(trainer, head)
        if dist.get_rank() == 0:
            write_reward_head(Path(hf_dir), w, trainer.export_dtype, _pad_id(trainer))
        dist.barrier()

    return after


def _pad_id(trainer: Trainer) -> int | None:
    if trainer.pad_id is not None:
        return int(trainer.pad_id)
    return getattr(trainer.bundle.hf_config, "pad_token_id", None)


def write_reward_head(hf_dir: Path, weight: torch.Tensor, dtype: torch.dtype | None,
                      pad_token_id: int | None) -> str:
    """Turn the exported HF dir into a reward model (see the module docstring); returns the
    head kind written."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)
    w = weight.to(dtype or torch.float32).contiguous()
    cls = seq_cls_class(cfg.model_type)
    if cls is None:
        save_file({"score.weight": w}, str(hf_dir / VALUE_HEAD_FILE), metadata={"format": "pt"})
        meta: dict[str, Any] = {"head": "value_head", "file": VALUE_HEAD_FILE,
                                "pooling": "last_token",
                                "input": "the base model's last_hidden_state (after the final "
                                "norm)", "model_type": cfg.model_type}
    else:
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            idx = json.loads(index.read_text())
            wm = idx["weight_map"]
            shard = wm.get("lm_head.weight") or sorted(set(wm.values()))[-1]
        else:
            idx, wm, shard = None, None, "model.safetensors"
        tensors = load_file(str(hf_dir / shard))
        tensors.pop("lm_head.weight", None)
        tensors["score.weight"] = w
        save_file(tensors, str(hf_dir / shard), metadata={"format": "pt"})
        if idx is not None:
            wm.pop("lm_head.weight", None)
            wm["score.weight"] = shard
            index.write_text(json.dumps(idx, indent=2))
        cfg.architectures = [cls]
        cfg.num_labels = 1
        if getattr(cfg, "pad_token_id", None) is None and pad_token_id is not None:
            cfg.pad_token_id = pad_token_id
        cfg.save_pretrained(hf_dir)
        meta = {"head": "sequence_classification", "class": cls, "pooling": "last_non_pad_token"}
    (hf_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta["head"]
