"""Training checkpoints: torch_dist model + optimizer, scheduler, RNG and data position.

Layout of ``<output_dir>/checkpoint-<step>/`` (a superset of :mod:`mvlm.convert.mcore_ckpt`'s, so
``mvlm convert --to hf`` and ``mvlm export`` read it, and ``--mcore_model`` starts from it)::

    mvlm_meta.json       model_type, HF config, padded vocab, saved layout, dtype, format_version,
                         layer_spec (+ "train")
    hf/                  tokenizer / processor / config files
    model/               torch_dist: {"model": ..., "optimizer": ...} (optimizer optional)
    trainer_state.json   step, consumed_samples, scheduler state, layout, world size, skipped
    rng/rank_<r>.pt      python/numpy/torch/Megatron-tracker RNG states of rank r
    rank_state/rank_<r>.pt  the Trainer's per-rank state (batches queued for repeat, the
                         objective's own, e.g. GRPO's rollout buffer), when it has any

Atomicity: everything goes into a hidden staging directory; after every rank has finished,
rank 0 renames it into place and only then rewrites ``<output_dir>/latest`` (temp file +
``os.replace``), so ``latest`` never names a partial checkpoint and a crash mid-save leaves the
previous one current. ``--save_total_limit`` prunes the oldest *published* checkpoints.

Resharding: ``torch_dist`` stores global tensors; the distributed optimizer state is saved
``fully_reshardable``; so a checkpoint resumes at another TP/PP/DP. RNG states are restored only
when the layout and world size are unchanged (otherwise there is no meaningful mapping; dropout-
free training is unaffected).

Layer specs: keys are Transformer Engine's under both specs (model and, since optimizer keys embed
them, optimizer state), so a run checkpointed with TE resumes without it and the other way round;
format-1 checkpoints (before the key names were unified) still load. See
:mod:`mvlm.convert.ckpt_format`.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mvlm.convert.ckpt_format import (
    adapt_model_keys,
    format_meta,
    load_module_state,
    load_sharded,
)
from mvlm.convert.hf_io import copy_aux_files
from mvlm.convert.mcore_ckpt import (
    META,
    dtype_name,
    model_keys,
    model_sharded_state_dict,
    read_meta,
)
from mvlm.convert.publish import fault_point, staged_publish
from mvlm.models.vlm import ModelBundle
from mvlm.runtime.compat import prime_optimizer_state, unshare_adam_steps
from mvlm.runtime.parallel import ParallelLayout

log = logging.getLogger("mvlm.train")

LATEST = "latest"
STATE = "trainer_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_OPT_META = {"distrib_optim_sharding_type": "fully_reshardable"}


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import random as mrandom

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        state["tracker"] = mrandom.get_cuda_rng_tracker().get_states()
    except Exception:  # noqa: BLE001 - a tracker without states has nothing to save
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        mrandom.get_cuda_rng_tracker().set_states(state["tracker"])


def _adapters_only(bundle: ModelBundle) -> bool:
    from mvlm.tuners import adapters  # mvlm.tuners: adapter runs checkpoint trainables only

    return bool(adapters(bundle))


def _sharded_state(bundle: ModelBundle, optimizer, is_loading: bool,
                   ckpt: tuple[Path, dict] | None = None) -> dict:
    """Model (+ optimizer) sharded state; when loading, ``ckpt`` = (model dir, meta) renames the
    model keys to the checkpoint's format first, so that the optimizer keys derived from them
    match too."""
    sd = model_sharded_state_dict(bundle)
    if _adapters_only(bundle):
        from mvlm.tuners.train_hooks import trainable_only

        sd = trainable_only(sd)
    if ckpt is not None:
        adapt_model_keys(sd, *ckpt)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                       metadata=dict(_OPT_META))
    return sd


# _ensure_optimizer_state / _unshare_adam_steps (megatron-core workarounds) live in
# mvlm.runtime.compat as prime_optimizer_state / unshare_adam_steps.


def save_checkpoint(out_dir: Path, step: int, bundle: ModelBundle, optimizer, scheduler,
                    layout: ParallelLayout, hf_src: Path, state: dict[str, Any],
                    save_total_limit: int | None = None, save_optim: bool = True,
                    rank_state: Any = None) -> Path:
    """Collective: write ``checkpoint-<step>`` atomically, point ``latest`` at it, prune.
    ``rank_state``: this rank's picklable trainer state (:func:`rank_state_file`)."""
    from megatron.core import dist_checkpointing

    out_dir = Path(out_dir)
    final = out_dir / checkpoint_name(step)

    def point_latest(published: Path) -> None:  # rank 0, after the rename
        write_latest(out_dir, published.name)
        if save_total_limit:
            prune(out_dir, save_total_limit)

    with staged_publish(final, overwrite=True, after_publish=point_latest) as staging:
        (staging / "model").mkdir(exist_ok=True)
        (staging / "rng").mkdir(exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(_sharded_state(bundle, optimizer if save_optim else None, False),
                                str(staging / "model"))
        fault_point("mid_write", staging)  # tests: torch_dist written, the rest not yet
        torch.save(_rng_state(), staging / "rng" / f"rank_{dist.get_rank():05d}.pt")
        if rank_state is not None:
            rank_state_file(staging).parent.mkdir(exist_ok=True)
            torch.save(rank_state, rank_state_file(staging))
        if dist.get_rank() == 0:
            full_state = {**state, "step": step, "layout": asdict(layout),
                          "world_size": dist.get_world_size(), "has_optimizer": save_optim,
                          "scheduler": scheduler.state_dict() if scheduler is not None else None}
            (staging / STATE).write_text(json.dumps(full_state, indent=2, default=str) + "\n")
            meta = {"format": "mvlm-mcore-v1", "model_type": bundle.hf_config.model_type,
                    "hf_config": bundle.hf_config.to_dict(), "vocab_padded": bundle.vocab_padded,
                    "saved_layout": asdict(layout), "dtype": dtype_name(bundle.config.params_dtype),
                    **format_meta(bundle.backend),
                    "train": {"step": step, "consumed_samples": state.get("consumed_samples")}}
            (staging / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            hf = staging / "hf"
            hf.mkdir()
            copy_aux_files(Path(hf_src), hf)
            bundle.hf_config.save_pretrained(hf)
    return final


def rank_state_file(path: Path) -> Path:
    """Where this rank's trainer state lives in checkpoint ``path``."""
    return Path(path) / "rank_state" / f"rank_{dist.get_rank():05d}.pt"


def write_latest(out_dir: Path, name: str) -> None:
    tmp = out_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, out_dir / LATEST)


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Published checkpoints (complete by construction), oldest first."""
    out = []
    if Path(out_dir).is_dir():
        for p in Path(out_dir).iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / STATE).exists():
                out.append((int(m.group(1)), p))
    return sorted(out)


def prune(out_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; never the one ``latest`` names."""
    latest = read_latest(out_dir)
    ckpts = list_checkpoints(out_dir)
    removed = []
    for _, p in ckpts[: max(0, len(ckpts) - keep)]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def read_latest(out_dir: Path) -> Path | None:
    f = Path(out_dir) / LATEST
    if not f.exists():
        return None
    p = Path(out_dir) / f.read_text().strip()
    return p if (p / STATE).exists() else None


def find_resume(resume: str, out_dir: Path) -> Path | None:
    """The checkpoint to continue from: ``auto`` = ``<output_dir>/latest`` if any."""
    if resume in ("none", "false", "False", "no"):
        return None
    if resume in ("auto", "true", "True", "1", "latest"):
        return read_latest(out_dir)
    p = Path(resume)
    if (p / LATEST).exists():
        p = read_latest(p) or p
    if not (p / STATE).exists():
        raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no {STATE}); "
                                "pass a checkpoint-<step> dir or the run's --output_dir")
    return p


def load_checkpoint(path: Path, bundle: ModelBundle, optimizer, scheduler,
                    layout: ParallelLayout) -> dict[str, Any]:
    """Collective: restore model (+ optimizer, scheduler, RNG); returns the trainer state."""
    path = Path(path)
    state = json.loads((path / STATE).read_text())
    meta = read_meta(path)
    with_opt = optimizer is not None and state.get("has_optimizer", True)
    if with_opt:
        prime_optimizer_state(optimizer)  # megatron-core workaround (runtime.compat)
    sd = _sharded_state(bundle, optimizer if with_opt else None, True,
                        ckpt=(path / "model", meta))
    loaded = load_sharded(sd, path / "model", with_optimizer=with_opt)
    for k, m in zip(model_keys(bundle), bundle.models, strict=True):
        load_module_state(m, loaded[k], strict=not _adapters_only(bundle))
    if with_opt:
        optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(optimizer)  # megatron-core 0.16.1 workaround (runtime.compat)
    elif optimizer is not None:
        log.warning("%s has no optimizer state (saved with --save_only_model): the optimizer "
                    "starts fresh", path)
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    same = state.get("layout") == asdict(layout) and state.get("world_size") == \
        dist.get_world_size()
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if same and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    elif dist.get_rank() == 0:
        log.info("resuming at a different layout (%s -> %s): RNG states not restored",
                 state.get("layout"), asdict(layout))
    return state
