"""torchrun worker for test_packing_mbs: packed micro-batches of N rows equal N micro-batches of 1.

One launch (``import megatron`` costs ~8 s per rank), two kinds of checks, numbers written to the
JSON file named by the spec's ``result``:

1. ``cases`` -- model level, through the trainer's own pieces (``build_train_dataset`` with
   ``--packing``, ``build_dataloader``, ``batches.same_length``, the ``sft`` objective's
   ``forward_step``, ``steps.microbatch_dims``, Megatron-Core's ``forward_backward_func``, DDP +
   ``finalize_model_grads`` with ``calculate_per_token_loss``): one step of
   ``--micro_batch_size 2`` x K micro-batches and one of ``--micro_batch_size 1`` x 2K
   micro-batches over the same packed rows; records the loss,
   the loss-token count and, per rank, max |d grad| over every trainable parameter (the gradient
   the optimizer sees: reduced over DP x CP and divided by the global token count).
2. ``runs`` -- whole `mvlm sft` trainings (``run_training``); the test compares their
   logging.jsonl.

Spec (JSON, argv[1]): ``{"model": DIR, "argv": [...common flags...], "result": FILE,
"cases": [{"name", "tp", "pp", "cp", "sp", "packs_per_step"}], "runs": [{"name", "argv"}]}``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _worker_common import drop_groups, run_trainings, worker_process_group


def model_case(spec: dict, case: dict) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.data.encode import build_dataloader, build_train_dataset
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.train.args import parse_train_args
    from mvlm.train.batches import same_length
    from mvlm.train.objectives import get_objective
    from mvlm.train.optim import wrap_ddp
    from mvlm.train.steps import microbatch_dims, reduce_stats, to_device

    tp, pp, cp, sp = case.get("tp", 1), case.get("pp", 1), case.get("cp", 1), case.get("sp", False)
    layout = ParallelLayout(tp=tp, pp=pp, cp=cp)
    startup(layout, seed=0, device="cpu")
    # A plain (not distributed) optimizer's DDP all-reduces: every rank then holds the whole
    # reduced gradient (the distributed one reduce-scatters, leaving partial sums elsewhere).
    argv = spec["argv"] + ["--tp", str(tp), "--pp", str(pp), "--cp", str(cp),
                           "--use_distributed_optimizer", "false",
                           "--sequence_parallel", str(sp).lower(), "--output_dir",
                           str(Path(spec["result"]).parent / f"case_{case['name']}")]
    cfg = parse_train_args(argv, "sft")
    bundle = build_model(AutoConfig.from_pretrained(spec["model"]), layout, dtype=torch.float32,
                         device="cpu", sequence_parallel=sp, perform_initialization=False)
    load_hf_weights(bundle, spec["model"])
    bundle.config.calculate_per_token_loss = True
    bundle.config.finalize_model_grads_func = finalize_model_grads
    ddp = wrap_ddp(bundle, cfg)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    data = build_train_dataset(cfg.data, spec["model"], dp_rank=dp_rank, dp_size=dp,
                               schedule=cfg.schedule)
    pad_mult = (2 * cp if cp > 1 else 1) * (tp if sp else 1)  # as the trainer computes it
    fb = get_forward_backward_func()
    forward_step = get_objective("sft").forward_step
    per_rank = case["packs_per_step"] // dp
    got = {}
    for mbs in (1, 2):
        loader = build_dataloader(data, micro_batch_size=mbs, dp_rank=dp_rank, dp_size=dp,
                                  seed=0, pad_to_multiple_of=pad_mult, cp_size=cp)
        it = iter(loader)
        batches = same_length([to_device(next(it), "cpu") for _ in range(per_rank // mbs)],
                              pp, 1, data.pad_token_id)
        rows, seq = microbatch_dims(batches, pp)
        for m in ddp:
            m.zero_grad_buffer()
        losses = fb(forward_step_func=forward_step, data_iterator=iter(batches), model=ddp,
                    num_microbatches=len(batches), seq_length=seq, micro_batch_size=rows,
                    forward_only=False)
        stats = reduce_stats(losses, "cpu")
        grads = {n: p.main_grad.detach().clone() for n, p in ddp[0].module.named_parameters()
                 if p.requires_grad}
        got[mbs] = {"loss": stats.loss, "tokens": stats.tokens, "grads": grads, "rows": rows,
                    "seq": seq, "n_micro": len(batches),
                    "samples": sum(b["num_samples"] for b in batches)}
    a, b = got[1], got[2]
    dgrad = max((a["grads"][n] - b["grads"][n]).abs().max().item() for n in a["grads"])
    gmax = max(g.abs().max().item() for g in a["grads"].values())
    t = torch.tensor([dgrad, gmax], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    out = {"dloss": abs(a["loss"] - b["loss"]), "loss": a["loss"], "tokens_mbs1": a["tokens"],
           "tokens_mbs2": b["tokens"], "max_dgrad": float(t[0]), "max_abs_grad": float(t[1]),
           "rows_mbs2": b["rows"], "seq_mbs2": b["seq"], "seq_mbs1": a["seq"],
           "micro_batches": [a["n_micro"], b["n_micro"]],
           "samples_rank": [a["samples"], b["samples"]]}
    drop_groups()
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    with worker_process_group() as rank:
        res: dict = {"cases": {}, "runs": {}}
        for case in spec.get("cases", []):
            t = time.time()
            res["cases"][case["name"]] = r = model_case(spec, case)
            if rank == 0:
                print(f"CASE {case['name']} {json.dumps(r)} ({time.time() - t:.1f}s)",
                      flush=True)
        run_trainings(spec.get("runs", []))
        if rank == 0:
            tmp = Path(spec["result"] + ".tmp")
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(spec["result"])
            print("WORKER OK", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
