"""DPO step time and peak memory vs an SFT step on the chosen answers alone, same model, same run.

    .venv/bin/python bench/dpo.py [--layers 4] [--pairs 8] [--micro 2] [--steps 3]

One script builds one checkpoint (tiny-Qwen2-VL "bench" variant cut to ``--layers`` decoder
layers, fp32) and one data set (the demo's colour questions with an image: chosen = the right
colour, rejected = another one), then runs two trainings through the real Trainer, each in its
own child process so that each high-water mark is its own:

* ``dpo``: full training, sigmoid DPO, the frozen copy of the start weights as reference (a
  reference forward pass each step, then one forward+backward with chosen and rejected packed
  into one row per pair);
* ``dpo_pre``: the same with ``--precompute_ref_log_probs`` (the reference's pass over the data
  happens once, inside the warm-up step; the timed steps have no reference forward);
* ``sft``: the same rows with the chosen answer only (prompt + chosen), SFT's objective.

Both DPO modes lay each pair out as ``[prompt][chosen][rejected]`` (the prompt and its image
computed once: ``mvlm.train.objectives.shared_prefix``); the child reports the layout it ran
(``pair_layout``: ``shared-prefix``, or why the two-segment rows were kept).

Same global batch (``--pairs`` rows), micro-batch, seed and step count. Per child: the median
``step_time_s`` of ``logging.jsonl`` over the steps after the first (warm-up); the median CPU
seconds of the same steps (``time.process_time`` around ``Trainer.train_step``: all threads of
the process, so what a step costs whatever else shares the cores -- the steadier number on a
loaded box; with ``--threads 1`` no OpenMP thread spins while waiting); and ``peak_mb`` = VmHWM
at the end minus VmRSS after imports (model, reference copy, gradients, Adam state,
activations). Prints a JSON summary and the ratios (DPO / SFT), wall and CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> dict:
    import time

    import torch
    import torch.distributed as dist

    from mvlm.train.args import parse_train_args
    from mvlm.train.objectives import dpo_losses as dl
    from mvlm.train.objectives.dpo import DPOObjective
    from mvlm.train.trainer import Trainer, train

    torch.set_num_threads(args.threads)
    cpu_s: list[float] = []
    step = Trainer.train_step

    def timed_step(self, batches):  # noqa: ANN001, ANN202 - Trainer.train_step's signature
        t0 = time.process_time()
        try:
            return step(self, batches)
        finally:
            cpu_s.append(time.process_time() - t0)

    Trainer.train_step = timed_step
    start_kb = _status_kb("VmRSS")
    dist.init_process_group("gloo")
    out = Path(args.work) / args.child
    data = Path(args.work) / ("sft.jsonl" if args.child == "sft" else "pairs.jsonl")
    argv = ["--model", str(Path(args.work) / "hf"), "--dataset", str(data),
            "--train_type", "full", "--torch_dtype", "float32",
            "--train_iters", str(args.steps + 1), "--micro_batch_size", str(args.micro),
            "--global_batch_size", str(args.pairs), "--lr", "1e-5", "--lr_warmup_iters", "0",
            "--max_length", "512", "--seed", "0", "--output_dir", str(out),
            "--save_final_checkpoint", "false", "--save_safetensors", "false",
            "--report_to", "none", "--disable_tqdm", "true",
            "--freeze_vit", "false", "--freeze_aligner", "false"]
    cfg = parse_train_args(argv, "sft")
    layout = None
    if args.child in ("dpo", "dpo_pre"):
        cfg.data.task = "preference"
        obj = DPOObjective(dl.DPOLossConfig(beta=0.1), reference="copy",
                           precompute_ref_log_probs=args.child == "dpo_pre")
        train(cfg, obj)
        layout = (obj.share_prefix.reason or "shared-prefix") if obj.share_prefix.decided \
            else "no step ran"
    else:
        train(cfg)
    peak_kb = _status_kb("VmHWM")
    logs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    times = [x["step_time_s"] for x in logs if "step_time_s" in x][1:]
    dist.destroy_process_group()
    return {"mode": args.child, "step_s": statistics.median(times), "step_times": times,
            "cpu_s": round(statistics.median(cpu_s[1:]), 4),
            "cpu_times": [round(x, 4) for x in cpu_s[1:]],
            "peak_mb": round((peak_kb - start_kb) / 1024, 1)} | \
        ({"pair_layout": layout} if layout else {})


def write_data(work: Path, n: int) -> None:
    from mvlm.demo_data import COLOURS, write_demo_dataset

    demo = write_demo_dataset(work / "data", n_train=n, n_val=0, image_size=112, seed=3,
                              kinds=("colour",))
    names = sorted(COLOURS)
    pairs, sft = [], []
    for r in (json.loads(x) for x in demo.train.read_text().splitlines()):
        images = [str((demo.train.parent / p).resolve()) for p in r["images"]]
        right = r["messages"][-1]["content"]
        wrong = names[(names.index(right) + 1) % len(names)]
        pairs.append({"images": images, "messages": r["messages"][:-1],
                      "chosen": {"role": "assistant", "content": right},
                      "rejected": {"role": "assistant", "content": wrong}})
        sft.append({"images": images, "messages": r["messages"]})
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (work / "sft.jsonl").write_text("".join(json.dumps(p) + "\n" for p in sft))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pairs", type=int, default=8, help="global batch: pairs (DPO) = rows (SFT)")
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=["dpo", "dpo_pre", "sft"], default=None)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    import platform
    import socket

    from mvlm.testing.tiny_models import build_tiny_checkpoint

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_dpo_"))
    build_tiny_checkpoint("qwen2_vl", work / "hf", variant="bench", num_hidden_layers=args.layers)
    write_data(work, args.pairs * (args.steps + 1))
    res = {}
    for mode in ("sft", "dpo", "dpo_pre"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                   WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, __file__, "--child", mode, "--work", str(work),
               "--layers", str(args.layers), "--pairs", str(args.pairs), "--micro",
               str(args.micro), "--steps", str(args.steps), "--threads", str(args.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            sys.exit(f"{mode} child failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-6000:]}")
        res[mode] = json.loads(line[-1][len("RESULT "):])
    summary = {"machine": f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} cores", "args": vars(args) | {"work": str(work)},
               **res,
               "step_time_ratio": round(res["dpo"]["step_s"] / res["sft"]["step_s"], 3),
               "cpu_time_ratio": round(res["dpo"]["cpu_s"] / res["sft"]["cpu_s"], 3),
               "precomputed_cpu_time_ratio": round(res["dpo_pre"]["cpu_s"]
                                                   / res["sft"]["cpu_s"], 3),
               "peak_mem_ratio": round(res["dpo"]["peak_mb"] / res["sft"]["peak_mb"], 3),
               "precomputed_step_time_ratio": round(res["dpo_pre"]["step_s"]
                                                    / res["sft"]["step_s"], 3),
               "precomputed_peak_mem_ratio": round(res["dpo_pre"]["peak_mb"]
                                                   / res["sft"]["peak_mb"], 3)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
