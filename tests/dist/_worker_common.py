"""Process-group plumbing shared by the torchrun workers of tests/dist (and the tiny preference
set-up of the two preference workers).

Workers run as scripts from tests/dist, so ``import _worker_common`` finds this file; a worker
elsewhere puts tests/dist on ``sys.path`` first.

* :func:`worker_process_group`: the gloo default group for the whole launch, torn down (every
  subgroup included) when the worker body returns.
* :func:`drop_groups`: between layouts. ``destroy_model_parallel`` only drops Megatron-Core's
  references to its TP/PP/DP/EP/CP groups; torch keeps every one of them, each with its own gloo
  I/O threads, so a launch that starts several layouts (``startup`` or ``run_training``) would
  pile up a few dozen live groups and threads per layout without it.
* :func:`run_trainings`: the list of ``mvlm pt|sft`` argv lists that several workers run after
  their own checks, in the same process group.
* :func:`write_gathered`: every rank's results, written by rank 0 as one JSON list.
* :func:`tiny_pair_model`, :func:`dpo_step0`: the tiny Qwen2-VL preference set-up and the
  step-0 DPO invariant of _preference_pair_worker.py and ../unit/_preference_shared_prefix_worker.py
  (single-process workers).
"""
from __future__ import annotations

import contextlib
import gc
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist


def drop_groups() -> None:
    """Tear down Megatron-Core's parallel state and destroy every process group but the default
    one (collective: every rank calls it at the same point)."""
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d as c10d

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    dist.barrier()
    for group in list(c10d._world.pg_map):
        if group is not c10d.GroupMember.WORLD:
            dist.destroy_process_group(group)
    gc.collect()  # destroyed groups still in reference cycles keep their gloo threads running
    if len(c10d._world.pg_map) != 1:
        raise RuntimeError(f"{len(c10d._world.pg_map) - 1} process groups outlived drop_groups")


@contextlib.contextmanager
def worker_process_group() -> Iterator[int]:
    """``with worker_process_group() as rank:`` -- the gloo default group (torchrun's env://),
    then, when the body returns, every subgroup destroyed, a barrier and the default group
    destroyed. An exception skips the teardown (no barrier another rank may never reach):
    torchrun ends the launch."""
    dist.init_process_group("gloo")
    yield dist.get_rank()
    drop_groups()
    dist.barrier()
    dist.destroy_process_group()


def run_trainings(runs: list[dict], default_task: str = "sft",
                  after: Callable[[dict], None] | None = None) -> None:
    """Run each ``{"name", "argv", "task"?, "expect_rc"?}`` through ``run_training`` in this
    process group, in order; ``after(run)`` (collective, optional) follows each run. Raises
    SystemExit on an unexpected return code; rank 0 prints ``RUN name done in Ns``. The groups
    of each run are destroyed before the next (:func:`drop_groups`)."""
    from mvlm.train.trainer import run_training

    for run in runs:
        t = time.time()
        rc = run_training(run["argv"], run.get("task", default_task))
        if rc != run.get("expect_rc", 0):
            raise SystemExit(f"run {run.get('name')} returned {rc}")
        if after is not None:
            after(run)
        drop_groups()
        if dist.get_rank() == 0:
            print(f"RUN {run.get('name')} done in {time.time() - t:.1f}s", flush=True)


def write_gathered(path: str | Path, result: object) -> None:
    """Collect every rank's ``result`` (JSON-able) and have rank 0 write the list, rank order,
    to ``path`` as JSON (collective)."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(everyone))


def tiny_pair_model(workdir: str | Path, rows: list[dict]) -> SimpleNamespace:
    """The preference workers' set-up: the tiny Qwen2-VL checkpoint and two images (a.png
    56x84, b.png 56x56, seeded noise) under ``workdir``, Megatron's state at one rank (seed 0),
    ``rows`` encoded as preference pairs and the model loaded from the checkpoint (fp32, eval).
    Returns hf, tmpl, encs, cfg, bundle, model."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.data import preference as P
    from mvlm.data.template import get_template
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    wd = Path(workdir)
    hf = build_tiny_checkpoint("qwen2_vl", wd / "hf")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (56, 84), "b.png": (56, 56)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(wd / name)
    layout = ParallelLayout()
    startup(layout, seed=0, device="cpu")
    tmpl = get_template(hf)
    encs = P.encode_preference_rows(tmpl, rows, str(wd))
    cfg = AutoConfig.from_pretrained(hf)
    bundle = build_model(cfg, layout, dtype=torch.float32, device="cpu",
                         perform_initialization=False)
    load_hf_weights(bundle, hf)
    return SimpleNamespace(hf=hf, tmpl=tmpl, encs=encs, cfg=cfg, bundle=bundle,
                           model=bundle.models[0].eval())


def dpo_step0(logps, chosen, rejected) -> tuple[bool, dict]:
    """Sigmoid DPO (beta 0.1) with the policy's log-probs as the reference too: (loss is fp32
    ln 2 bit for bit, the summarized metrics)."""
    import math

    import torch

    from mvlm.train.objectives import dpo_losses as dl

    c, r = logps[chosen], logps[rejected]
    res = dl.dpo_loss(c, r, c.clone(), r.clone(), dl.DPOLossConfig(beta=0.1))
    exact = torch.equal(res.loss, torch.tensor(math.log(2.0), dtype=torch.float32))
    return exact, dl.summarize_metrics(res.metrics)
