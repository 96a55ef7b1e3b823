"""Training-step overhead on CPU: mvlm (Megatron-Core, TP1, the real Trainer) vs transformers +
torch AdamW, same model, batch, optimizer, dtype and threads, in one run.

    .venv/bin/python bench/train_overhead.py [--hidden 384] [--layers 4] [--rows 4]
        [--seq 256] [--steps 12] [--warmup 2] [--threads 1] [--profile 3]
        [--optimizer_calls 0] [--one_process] [--baseline_tree DIR]

Each side runs in a process of its own (the default), as a user runs one or the other: a worker
per side builds its model and waits; the parent hands out steps in lock-step, one mvlm step and
one transformers step per round (order flipped every round), so the other worker sleeps while
one steps and drift of the shared 2-core box hits both sides alike. Separate processes matter:
each step's CPU time (``time.process_time`` of the worker, i.e. every thread of it) is then that
side's own, background threads included (mvlm's gloo groups, transformers' nothing), and each
side's memory comes from its own glibc heap, so neither pays for page faults that the other's
freed memory causes. ``--one_process`` runs both in one process as earlier rounds did (the CPU
adaptations and allocator state then apply to both sides). The first ``--warmup`` steps of each
side are not timed.

``--baseline_tree DIR`` replaces the transformers side with a second mvlm worker that imports
mvlm from ``DIR`` (e.g. ``git archive <commit> mvlm | tar -x -C DIR``): a lock-step A/B of two
mvlm versions on the same model and batches, whose median of the rounds' CPU-time ratios
(``paired_ratio_cpu_time``, baseline over current: above 1 means the current tree is faster) sees
the box's drift on both sides alike; ``DIR`` equal to the current tree gives the noise floor.

The work is the same on both sides:

* model: a random tiny Qwen2 checkpoint (``mvlm.testing.tiny_models``, ``--hidden`` /
  ``--layers``, fp32) written once; mvlm loads it through its conversion code
  (``load_hf_weights``), transformers with ``from_pretrained`` (SDPA attention);
* batch: ``--rows`` rows of ``--seq`` random tokens, every token a label (mvlm gets the shifted
  labels Megatron expects, HF shifts inside its loss), so the mean token loss is the same number;
* optimizer: AdamW, lr 1e-4, betas (0.9, 0.95), eps 1e-8, no weight decay, gradient clipping at
  1.0 (transformers: ``clip_grad_norm_`` + ``torch.optim.AdamW``, by default with ``fused=True``
  as transformers' Trainer builds it (``--hf_optim adamw_torch_fused``, its default optimizer
  since torch 2.8; ``adamw_torch``: torch's default single-tensor loop); mvlm: Megatron-Core's
  distributed optimizer, fp32 main grads, the NaN guard on, as ``mvlm sft`` runs it).

Reported: median step time and tokens/s of each side, the ratio mvlm / transformers, the same
per CPU second of the stepping process (and the median over rounds of the two steps' CPU-time
ratio), the CPU time of threads other than the stepping one (``process_time`` minus the main
thread's ``thread_time``: e.g. gloo's event loops), the median and largest number of minor page
faults of a timed step (``getrusage``: fresh pages the kernel had to map and zero, part of that
CPU time), the first-step losses (equal up to fp32 rounding: proof of the same work), and with
``--profile N`` the top-5 operators of N profiled steps of each side by self CPU time
(``torch.profiler``) next to the share of the step spent outside any operator (Python and
framework bookkeeping).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LR, BETAS, EPS, CLIP = 1e-4, (0.9, 0.95), 1e-8, 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=12, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    p.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    p.add_argument("--profile", type=int, default=3,
                   help="mvlm steps to profile after the timing (0: none)")
    p.add_argument("--optimizer_calls", type=int, default=0,
                   help="after the timing: this many alternating calls of torch's own AdamW step "
                        "and mvlm's flat CPU step (runtime/flat_adam.py) on mvlm's optimizer")
    p.add_argument("--hf_optim", choices=("adamw_torch_fused", "adamw_torch"),
                   default="adamw_torch_fused",
                   help="the transformers side's AdamW, named as transformers' Trainer names them: "
                        "fused=True (the Trainer's default) or torch's single-tensor loop")
    p.add_argument("--one_process", action="store_true",
                   help="both sides in this process (earlier rounds' layout)")
    p.add_argument("--baseline_tree", default=None,
                   help="instead of transformers, mvlm imported from this directory (A/B)")
    p.add_argument("--worker", choices=("mvlm", "transformers", "mvlm_baseline"), default=None,
                   help=argparse.SUPPRESS)  # internal: one side's process
    p.add_argument("--work_dir", default=None)
    p.add_argument("--out", default=None, help="write the JSON summary here")
    return p.parse_args(argv)


def build_checkpoint(args: argparse.Namespace, work: Path) -> Path:
    """The random tiny Qwen2 both sides load, written to ``work / "hf"``."""
    import torch

    from mvlm.testing.tiny_models import build_tiny_checkpoint

    return build_tiny_checkpoint(
        "qwen2", work / "hf", dtype=torch.float32, hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate)


def make_batches(args: argparse.Namespace, vocab: int, n: int = 2) -> list[Any]:
    import torch

    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        out.append(torch.randint(3, vocab, (args.rows, args.seq), generator=g))
    return out


class HFSide:
    """transformers' Qwen2ForCausalLM with torch.optim.AdamW and clip_grad_norm_."""

    def __init__(self, hf_dir: Path, optim: str = "adamw_torch_fused") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="sdpa").train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                     weight_decay=0.0, fused=optim == "adamw_torch_fused")

    def step(self, ids: Any) -> float:
        import torch

        out = self.model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())


class MvlmSide:
    """mvlm's Trainer.train_step with the ``sft`` objective, as ``mvlm sft`` runs it at TP1."""

    def __init__(self, hf_dir: Path, args: argparse.Namespace) -> None:
        import torch
        from transformers import AutoConfig

        from mvlm.config import (
            FreezeConfig,
            OptimConfig,
            ParallelConfig,
            ScheduleConfig,
            TrainConfig,
        )
        from mvlm.convert.bridge import load_hf_weights
        from mvlm.models.vlm import build_model
        from mvlm.runtime.parallel import ParallelLayout
        from mvlm.runtime.startup import startup
        from mvlm.train.objectives import get_objective
        from mvlm.train.trainer import Trainer

        layout = ParallelLayout(tp=1)
        device = startup(layout, seed=1234, device="cpu").device
        hf_config = AutoConfig.from_pretrained(hf_dir)
        self.vocab = hf_config.vocab_size
        bundle = build_model(hf_config, layout, dtype=torch.float32, device=device,
                             backend="local", perform_initialization=False)
        load_hf_weights(bundle, hf_dir)
        cfg = TrainConfig(
            task="sft", output_dir=str(Path(args.work_dir) / "mvlm_out"),
            optim=OptimConfig(lr=LR, min_lr=LR, lr_decay_style="constant", weight_decay=0.0,
                              adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS,
                              clip_grad=CLIP, check_for_nan_in_loss_and_grad=True),
            freeze=FreezeConfig(freeze_vit=False, freeze_aligner=False, freeze_llm=False),
            parallel=ParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=False),
            schedule=ScheduleConfig(micro_batch_size=args.rows, global_batch_size=args.rows))
        self.trainer = Trainer(cfg, bundle, layout, objective=get_objective("sft"),
                               device=device)
        self.trainer.build_scheduler(10**6)
        for m in self.trainer.ddp_models:
            m.train()

    @staticmethod
    def batch(ids: Any) -> dict:
        import torch

        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]  # Megatron's targets: labels[t] = token t + 1
        pos = torch.arange(ids.shape[1]).expand(3, *ids.shape).contiguous()
        return {"input_ids": ids, "labels": labels, "position_ids": pos}

    def step(self, batch: dict) -> float:
        return self.trainer.train_step([batch]).stats.loss


def profile_top(step: Any, n: int, k: int = 5) -> dict[str, Any]:
    """Top-``k`` operators by self CPU time over ``n`` calls of ``step``, and the share of the
    wall time no operator accounts for (host-side Python/framework work)."""
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    wall_us = (time.perf_counter() - t) * 1e6
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / n, 2),
            "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": e.count // n}
           for e in events[:k]]
    return {"steps": n, "wall_ms_per_step": round(wall_us / 1e3 / n, 1),
            "ops_ms_per_step": round(total / 1e3 / n, 1),
            "outside_ops_share": round(max(0.0, 1 - total / wall_us), 3),
            "op_calls_per_step": sum(e.count for e in events) // n, "top": top}


def time_optimizer_step(mv: MvlmSide, calls: int) -> dict[str, Any]:
    """Median CPU ms of the inner Adam update alone: torch's per-parameter loop (the original
    ``step`` the flat one wraps) and the flat step, alternating, on the gradients of the last
    training step (the updates move the weights; the timing is all that is kept)."""
    from mvlm.runtime.flat_adam import FlatAdamStep

    opt = mv.trainer.optimizer
    inner = (getattr(opt, "chained_optimizers", None) or [opt])[0].optimizer
    flat = inner.step
    if not isinstance(flat, FlatAdamStep):
        return {"flat_step_installed": False}
    fns = {"torch_loop_ms": flat.original, "flat_ms": flat}
    t: dict[str, list[float]] = {k: [] for k in fns}
    for k in range(calls):
        for name in (list(fns) if k % 2 == 0 else list(fns)[::-1]):
            c = time.process_time()
            fns[name]()
            t[name].append(time.process_time() - c)
    out: dict[str, Any] = {k: round(statistics.median(v) * 1e3, 2) for k, v in t.items()}
    out["flat_updates_per_step"] = flat.updates_last_step
    out["params"] = sum(len(g["params"]) for g in inner.param_groups)
    return out


def timed(step: Any) -> dict[str, Any]:
    """One call of ``step`` with its wall time, CPU time of this process and minor faults."""
    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t, c, m = time.perf_counter(), time.process_time(), time.thread_time()
    loss = step()
    dt, dc, dm = time.perf_counter() - t, time.process_time() - c, time.thread_time() - m
    return {"wall": dt, "cpu": dc, "background_cpu": max(0.0, dc - dm),
            "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f, "loss": loss}


class Side:
    """One side's model, batches and step (``name``: mvlm or transformers)."""

    def __init__(self, name: str, hf_dir: Path, args: argparse.Namespace) -> None:
        if name in ("mvlm", "mvlm_baseline"):
            mv = MvlmSide(hf_dir, args)
            ids = make_batches(args, mv.vocab)
            batches = [MvlmSide.batch(x) for x in ids]
            self.step = lambda k: mv.step(batches[k % 2])
            self.mvlm: MvlmSide | None = mv
        else:
            hf = HFSide(hf_dir, args.hf_optim)
            ids = make_batches(args, hf.model.config.vocab_size)
            self.step = lambda k: hf.step(ids[k % 2])
            self.mvlm = None
            self.vocab = hf.model.config.vocab_size
            self.params = sum(p.numel() for p in hf.model.parameters())


def worker(args: argparse.Namespace) -> int:
    """One side in a process of its own: answers ``step K``, ``profile N``, ``optimizer N`` and
    ``quit`` on stdin with one JSON line each on stdout (everything else goes to stderr)."""
    import torch

    torch.set_num_threads(args.threads)
    out, sys.stdout = sys.stdout, sys.stderr  # library prints must not reach the protocol
    side = Side(args.worker, Path(args.work_dir) / "hf", args)
    info: dict[str, Any] = {"ready": True}
    if side.mvlm is None:
        info.update(vocab=side.vocab, params=side.params)
    else:
        import mvlm

        info.update(vocab=side.mvlm.vocab, mvlm_from=str(Path(mvlm.__file__).parent))
    print(json.dumps(info), file=out, flush=True)
    for line in sys.stdin:
        cmd, n = line.split()
        k = int(n)
        if cmd == "step":
            res: Any = timed(functools.partial(side.step, k))
        elif cmd == "profile":
            res = profile_top(lambda: side.step(0), k)
        elif cmd == "optimizer":
            res = time_optimizer_step(side.mvlm, k) if side.mvlm else {}
        else:
            break
        print(json.dumps(res), file=out, flush=True)
    return 0


class WorkerProcess:
    """The parent's handle on one side's worker process."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        env = None
        if name == "mvlm_baseline":  # the other mvlm version, first on the import path
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(Path(args.baseline_tree).resolve()), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
               "--work_dir", str(args.work_dir), "--threads", str(args.threads)]
        for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "rows", "seq",
                  "hf_optim"):
            cmd += [f"--{k}", str(getattr(args, k))]
        self.log = open(Path(args.work_dir) / f"{name}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self.name = name
        self.info = self._read()

    def _read(self) -> Any:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.close()
            raise RuntimeError(f"the {self.name} worker exited (rc {self.proc.returncode}); its "
                               f"output is in {self.log.name}")
        return json.loads(line)

    def ask(self, cmd: str, n: int) -> Any:
        self.proc.stdin.write(f"{cmd} {n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit 0\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        self.log.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    build_checkpoint(args, work)
    other = "mvlm_baseline" if args.baseline_tree else "transformers"
    if args.baseline_tree and args.one_process:
        raise SystemExit("--baseline_tree needs one process per side (drop --one_process)")
    steps: dict[str, list[dict[str, Any]]] = {"mvlm": [], other: []}
    extra: dict[str, Any] = {}
    if args.one_process:
        # mvlm first: its start-up installs the CPU adaptations, for both sides in this layout.
        sides: dict[str, Any] = {n: Side(n, work / "hf", args) for n in steps}
        call = {n: (lambda n, k: timed(lambda: sides[n].step(k))) for n in steps}
        model = {"vocab": sides["transformers"].vocab, "params": sides["transformers"].params}
    else:
        procs = {n: WorkerProcess(n, args) for n in steps}
        call = {n: (lambda n, k: procs[n].ask("step", k)) for n in steps}
        model = {k: v for k, v in procs[other].info.items() if k in ("vocab", "params")}
        extra["mvlm_from"] = {n: p.info["mvlm_from"] for n, p in procs.items()
                              if "mvlm_from" in p.info}
    try:
        for k in range(args.warmup + args.steps):
            order = ("mvlm", other) if k % 2 == 0 else (other, "mvlm")
            for name in order:
                steps[name].append(call[name](name, k))
        if args.optimizer_calls:
            extra["optimizer_step"] = (
                time_optimizer_step(sides["mvlm"].mvlm, args.optimizer_calls) if args.one_process
                else procs["mvlm"].ask("optimizer", args.optimizer_calls))
        if args.profile:
            for name in steps:
                extra[f"{name}_profile"] = (
                    profile_top(functools.partial(sides[name].step, 0), args.profile)
                    if args.one_process else procs[name].ask("profile", args.profile))
    finally:
        if not args.one_process:
            for p in procs.values():
                p.close()
    tokens = args.rows * args.seq
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__, "threads": args.threads, "hf_optim": args.hf_optim,
        "layout": "one process" if args.one_process else "one process per side",
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "kv_heads": args.kv_heads, "intermediate": args.intermediate, **model},
        "tokens_per_step": tokens, "steps": args.steps, "warmup": args.warmup, "sides": {}}
    for name, recs in steps.items():
        timed_recs = recs[args.warmup:]
        med = statistics.median(r["wall"] for r in timed_recs)
        med_cpu = statistics.median(r["cpu"] for r in timed_recs)
        faults = [r["faults"] for r in timed_recs]
        res["sides"][name] = {"median_step_s": round(med, 4), "tokens_per_s": round(tokens / med),
                              "median_cpu_s": round(med_cpu, 4),
                              "tokens_per_cpu_s": round(tokens / med_cpu),
                              "min_step_s": round(min(r["wall"] for r in timed_recs), 4),
                              "median_background_cpu_ms": round(1e3 * statistics.median(
                                  r["background_cpu"] for r in timed_recs), 2),
                              "median_minor_faults": statistics.median(faults),
                              "max_minor_faults": max(faults),
                              "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"]}
    s = res["sides"]
    res["baseline"] = other
    res[f"ratio_mvlm_over_{other}"] = round(
        s["mvlm"]["tokens_per_s"] / s[other]["tokens_per_s"], 3)
    res["ratio_cpu_time"] = round(
        s["mvlm"]["tokens_per_cpu_s"] / s[other]["tokens_per_cpu_s"], 3)
    # Per round: the two sides' steps ran next to each other, so their ratio sees the same load.
    rounds = zip(steps["mvlm"][args.warmup:], steps[other][args.warmup:], strict=True)
    res["paired_ratio_cpu_time"] = round(statistics.median(
        t["cpu"] / m["cpu"] for m, t in rounds), 4 if args.baseline_tree else 3)
    res["first_loss_diff"] = abs(s["mvlm"]["first_loss"] - s[other]["first_loss"])
    res.update(extra)
    return res


def format_table(res: dict[str, Any]) -> str:
    lines = ["| side | median step s | tokens/s | CPU s/step | tokens/CPU-s | first loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in res["sides"].items():
        lines.append(f"| {name} | {r['median_step_s']} | {r['tokens_per_s']} | "
                     f"{r['median_cpu_s']} | {r['tokens_per_cpu_s']} | {r['first_loss']:.6f} |")
    other = res["baseline"]
    lines.append(f"\nratio mvlm / {other}: tokens/s {res[f'ratio_mvlm_over_{other}']}, "
                 f"tokens per CPU second {res['ratio_cpu_time']} (median of the rounds' "
                 f"ratios: {res['paired_ratio_cpu_time']})")
    if "optimizer_step" in res:
        lines.append(f"\nmvlm optimizer update alone (median CPU ms): {res['optimizer_step']}")
    for side in ("mvlm", other):
        prof = res.get(f"{side}_profile")
        if not prof:
            continue
        lines.append(f"\n{side} profile: {prof['wall_ms_per_step']} ms/step wall, "
                     f"{prof['ops_ms_per_step']} ms in ops, {prof['outside_ops_share']:.1%} "
                     f"outside ops, {prof['op_calls_per_step']} op calls/step")
        for t in prof["top"]:
            lines.append(f"  {t['op']}: {t['self_ms_per_step']} ms/step "
                         f"({t['share']:.1%}, {t['calls_per_step']} calls)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="mvlm_train_overhead_") as tmp:
        args.work_dir = args.work_dir or tmp
        res = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
