"""`mvlm demo`: the README's main job -- train a tiny VLM end to end on this machine and prove it.

What it does, in order (each step prints where its output went):

1. Builds a tiny random-weight Qwen2.5-VL checkpoint (tokenizer, chat template, processor and
   all) with :func:`mvlm.testing.tiny_models.build_tiny_checkpoint`: nothing is downloaded.
2. Writes the coloured-shapes dataset (:mod:`mvlm.demo_data`): ms-swift JSONL, train + held-out.
3. Conversion round trip: HF -> Megatron-Core torch_dist sharded TP=N on N ranks with logits
   verified against HF, back to HF at TP=1, every tensor bit-identical.
4. Accuracy *before*: transformers loads the initial checkpoint and answers the held-out questions
   greedily; exact match against the expected word (chance level is printed too).
5. Trains with ``torchrun --nproc-per-node N -m mvlm sft ... --tp N`` -- the same command a user
   runs -- and shows the loss falling (read from ``<output_dir>/logging.jsonl``).
6. Exports the trained model to HF safetensors and measures accuracy *after* with transformers on
   the exported directory, so the final check is literally "transformers, loading what mvlm wrote,
   gives the right answer"; shows one such answer.
7. Writes ``demo_result.json`` (accuracies, chance, loss curve, timings, paths) and exits non-zero
   unless accuracy ended far above chance.

On a CPU machine N = 2 (gloo); with GPUs N = min(#GPUs, 2) and training runs on them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# The tiny model, a little wider than the test default: 128 hidden learns the task within the
# step budget below on 2 CPU cores; smaller widths plateau at chance for longer.
DEMO_MODEL: dict[str, Any] = {"hidden_size": 128, "intermediate_size": 256,
                              "num_hidden_layers": 2}
# 112 px = 8x8 patches = 16 merged image tokens: enough for the tower to tell shapes apart
# (56 px, 4 tokens, learns colour but barely shape in the same number of steps).
DEMO_IMAGE_SIZE = 112
DEFAULT_DEMO_FAMILY = "qwen2_5_vl"

# The bar the demo must clear: accuracy after training at least this, and at least this far above
# both chance and the untrained model. Measured runs end at 0.85-1.0; chance is 0.29.
MIN_ACCURACY = 0.6
MIN_GAIN_OVER_CHANCE = 0.25


@dataclass
class DemoConfig:
    """`mvlm demo`'s settings (the defaults are the README's run); the CLI builds it from
    :func:`add_demo_args`'s flags with :meth:`from_flags`."""

    output_dir: str = "mvlm_demo"
    model_type: str = DEFAULT_DEMO_FAMILY
    nproc: int | None = None  # default: 2 on CPU, min(#GPUs, 2)
    train_iters: int = 200
    micro_batch_size: int = 8
    lr: float = 3e-3
    n_train: int = 480
    n_val: int = 48
    seed: int = 0
    train_type: str = "full"  # full | lora | dora | lora_llm
    lora_rank: int = 16
    modules_to_save: list[str] = field(default_factory=list)
    skip_roundtrip: bool = False

    @classmethod
    def from_flags(cls, values: dict[str, Any]) -> DemoConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", default="mvlm_demo", help="where everything is written")
    p.add_argument("--model_type", default=DEFAULT_DEMO_FAMILY, choices=demo_families(),
                   help="the vision-language family whose tiny random checkpoint the demo "
                        "builds and trains (default: %(default)s)")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks for conversion and training (default: 2 on CPU, min(#GPUs, 2))")
    p.add_argument("--train_iters", type=int, default=200, help="optimizer steps")
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n_train", type=int, default=480, help="training rows to generate")
    p.add_argument("--n_val", type=int, default=48, help="held-out rows to generate")
    p.add_argument("--seed", type=int, default=0)
    # mvlm.tuners (minimal marked edit): the same demo with adapters instead of full SFT
    p.add_argument("--train_type", default="full", choices=["full", "lora", "dora", "lora_llm"],
                   help="lora/dora: adapters on every linear (LLM + vision tower), merged export")
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--modules_to_save", nargs="*", default=[],
                   help="trained in full beside the adapters (e.g. embed_tokens lm_head: the "
                        "demo's base has random weights, so its vocabulary head must learn)")
    p.add_argument("--skip_roundtrip", action="store_true",
                   help="skip the conversion round-trip step (it is checked by default)")


def demo_families() -> list[str]:
    """Registered families that take images (the shapes task needs a vision tower)."""
    from mvlm.models.registry import families

    return sorted(f.name for f in families() if f.is_vlm)


def _default_nproc() -> int:
    import torch

    if torch.cuda.is_available():
        return max(1, min(torch.cuda.device_count(), 2))
    return 2


def _torchrun(nproc: int, args: list[str], log_file: Path | None = None) -> None:
    """Run ``mvlm <args>`` on ``nproc`` local ranks; raise with the log's tail if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "mvlm", *args]
    print("$ torchrun", " ".join(cmd[3:]), flush=True)
    # One intra-op thread per rank: N ranks on N cores must not oversubscribe them.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if log_file is None:
        subprocess.run(cmd, check=True, env=env)
        return
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(True)[-40:])
        raise RuntimeError(f"`mvlm {args[0]}` failed (exit {proc.returncode}); last lines of "
                           f"{log_file}:\n{tail}")


# ----------------------------------------------------------------------------------------------
# Evaluation with transformers
# ----------------------------------------------------------------------------------------------


def load_hf(model_dir: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """The HF model class named by the family registry, and the checkpoint's own processor."""
    import torch
    import transformers

    from mvlm.models.registry import get_family

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, get_family(cfg.model_type).hf_model_class)
    model = cls.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    return model, processor


def answer_accuracy(model_dir: str | Path, val_jsonl: str | Path, *, device: str = "cpu",
                    batch_size: int = 16, max_new_tokens: int = 6) -> tuple[float, list[dict]]:
    """Exact-match accuracy of greedy answers from the HF checkpoint in ``model_dir``.

    Each held-out row's user turn (image + question) is rendered with the checkpoint's own chat
    template, the model generates greedily, and the decoded answer (special tokens dropped,
    whitespace stripped) must equal the row's assistant answer exactly. Returns the accuracy and
    one record per row (question, image, expected, answer, correct).
    """
    import torch
    from PIL import Image

    model, processor = load_hf(model_dir, device)
    tok = processor.tokenizer
    tok.padding_side = "left"  # batched generation continues every row from its own last token
    val = Path(val_jsonl)
    rows = [json.loads(line) for line in val.read_text().splitlines() if line.strip()]
    records: list[dict] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        texts, images = [], []
        for row in chunk:
            question = row["messages"][0]["content"].replace("<image>", "")
            msgs = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
            texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True,
                                                       tokenize=False))
            images.append(Image.open(val.parent / row["images"][0]).convert("RGB"))
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        for row, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            answer = tok.decode(ids, skip_special_tokens=True).strip()
            expected = row["messages"][1]["content"]
            records.append({"question": row["messages"][0]["content"],
                            "image": str(val.parent / row["images"][0]),
                            "expected": expected, "answer": answer,
                            "correct": answer == expected})
    acc = sum(r["correct"] for r in records) / max(1, len(records))
    return acc, records


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def conversion_roundtrip(hf_dir: Path, out: Path, nproc: int) -> int:
    """HF -> mcore (TP=nproc, logits verified) -> HF; returns the number of identical tensors."""
    import torch
    from safetensors.torch import load_file

    mcore_dir, back_dir = out / "roundtrip_mcore", out / "roundtrip_hf"
    _torchrun(nproc, ["convert", "--to", "mcore", "--model", str(hf_dir), "--output",
                      str(mcore_dir), "--tp", str(nproc), "--verify", "--overwrite"],
              out / "logs" / "convert_to_mcore.log")
    _torchrun(1, ["convert", "--to", "hf", "--model", str(mcore_dir), "--output",
                  str(back_dir), "--overwrite"], out / "logs" / "convert_to_hf.log")
    a, b = load_file(hf_dir / "model.safetensors"), load_file(back_dir / "model.safetensors")
    bad = sorted(set(a) ^ set(b)) or [k for k in a if not torch.equal(a[k], b[k])]
    if bad:
        raise RuntimeError(f"conversion round trip changed {len(bad)} tensors, e.g. {bad[:3]}")
    return len(a)


def sft_args(hf_dir: Path, data_train: Path, train_dir: Path, nproc: int,
             args: DemoConfig) -> list[str]:
    """The `mvlm sft` command line the demo runs (ms-swift flag names, as a user would type)."""
    iters = args.train_iters
    return ["sft", "--model", str(hf_dir), "--dataset", str(data_train),
            "--train_type", "full", "--train_iters", str(iters),
            "--micro_batch_size", str(args.micro_batch_size),
            "--global_batch_size", str(args.micro_batch_size),
            "--lr", f"{args.lr:g}", "--min_lr", f"{args.lr / 20:g}",
            "--lr_decay_style", "cosine", "--lr_warmup_fraction", "0.05",
            "--weight_decay", "0.0", "--clip_grad", "1.0", "--max_length", "256",
            "--freeze_vit", "false", "--freeze_aligner", "false",  # the tower must learn shapes
            "--seed", str(args.seed), "--tp", str(nproc),
            "--save_interval", str(iters), "--output_dir", str(train_dir)
            ] + _moe_sp_args(hf_dir, nproc) + _adapter_args(args)


def _moe_sp_args(hf_dir: Path, nproc: int) -> list[str]:
    """Megatron-Core trains MoE layers at TP > 1 only with sequence parallelism."""
    if nproc <= 1:
        return []
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)  # config.json omits fields left at their default
    experts = getattr(getattr(cfg, "text_config", cfg), "num_experts", None)
    return ["--sequence_parallel", "true"] if experts else []


def _adapter_args(args: DemoConfig) -> list[str]:
    """mvlm.tuners: adapter flags; merged export so the accuracy check loads a plain HF dir."""
    tt = args.train_type
    if tt == "full":
        return []
    r = args.lora_rank
    return ["--train_type", tt, "--lora_rank", str(r), "--lora_alpha", str(2 * r),
            "--lora_dropout", "0", "--merge_lora", "true"] + (
                ["--modules_to_save", *args.modules_to_save] if args.modules_to_save else [])


def read_losses(logging_jsonl: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from the trainer's ``logging.jsonl`` (lines without a loss skipped)."""
    out = []
    for line in logging_jsonl.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            out.append((int(rec["step"]), float(rec["loss"])))
    return out


def loss_summary(losses: list[tuple[int, float]], points: int = 8) -> str:
    """A few evenly spaced (step: loss) points, first and last included, on one line."""
    if not losses:
        return "(no losses logged)"
    idx = sorted({round(i * (len(losses) - 1) / max(1, points - 1)) for i in range(points)})
    return "  ".join(f"{losses[i][0]}:{losses[i][1]:.3f}" for i in idx)


def find_hf_export(train_dir: Path) -> Path | None:
    """The HF safetensors directory the trainer wrote at the end of training, if any."""
    if (train_dir / "hf" / "config.json").is_file():  # where `mvlm sft` exports by default
        return train_dir / "hf"
    cands = [p.parent for p in train_dir.rglob("config.json")
             if any(p.parent.glob("*.safetensors"))]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def sft_available() -> bool:
    """Whether this build's CLI has the `sft` command the demo trains with."""
    from mvlm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "sft" in sub.choices


def run_demo(args: DemoConfig) -> int:
    import torch

    from mvlm.demo_data import chance_accuracy, write_demo_dataset
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    t0 = time.time()
    times: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        times[name] = round(time.time() - since, 1)
        return time.time()

    if not sft_available():
        # Fail before minutes of work, not after: the demo's point is the training step.
        print("mvlm demo: error: this build has no `mvlm sft` command (the trainer); the demo "
              "trains with it", file=sys.stderr)
        return 1
    out = Path(args.output_dir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    nproc = args.nproc or _default_nproc()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"[demo] output: {out}  ranks: {nproc}  device: {device}", flush=True)

    t = time.time()
    family = args.model_type
    if family not in demo_families():
        print(f"mvlm demo: error: --model_type {family!r} is not a vision-language family mvlm "
              f"builds; choose one of {', '.join(demo_families())}", file=sys.stderr)
        return 2
    from mvlm.models.registry import get_family

    hf_dir = build_tiny_checkpoint(family, out / "hf_init", seed=args.seed, **DEMO_MODEL,
                                   **get_family(family).tiny_spec().demo_overrides)
    data = write_demo_dataset(out / "data", n_train=args.n_train, n_val=args.n_val,
                              image_size=DEMO_IMAGE_SIZE, seed=args.seed)
    chance = chance_accuracy(data.kinds)
    print(f"[demo] 1. tiny {family} checkpoint (random weights): {hf_dir}")
    print(f"[demo] 2. dataset: {data.train} ({data.n_train} rows), {data.val} ({data.n_val} "
          f"held-out rows); questions about {', '.join(data.kinds)}; chance = {chance:.2f}")
    t = lap("build", t)

    if not args.skip_roundtrip:
        n = conversion_roundtrip(hf_dir, out, nproc)
        print(f"[demo] 3. conversion round trip HF -> Megatron-Core (TP={nproc}, logits "
              f"verified) -> HF: {n} tensors bit-identical ({out / 'roundtrip_hf'})")
        t = lap("roundtrip", t)

    acc_before, _ = answer_accuracy(hf_dir, data.val, device=device)
    print(f"[demo] 4. accuracy before training (transformers, {hf_dir.name}): "
          f"{acc_before:.2f}")
    t = lap("eval_before", t)

    train_dir = out / "train"
    # A fresh run each time: the trainer would otherwise resume from the previous run's latest
    # checkpoint (its documented default) and train zero steps.
    shutil.rmtree(train_dir, ignore_errors=True)
    print(f"[demo] 5. training (log: {out / 'logs' / 'sft.log'})", flush=True)
    _torchrun(nproc, sft_args(hf_dir, data.train, train_dir, nproc, args),
              out / "logs" / "sft.log")
    losses = read_losses(train_dir / "logging.jsonl")
    print(f"[demo]    loss (step:loss): {loss_summary(losses)}")
    latest = train_dir / "latest"
    ckpt = train_dir / latest.read_text().strip() if latest.is_file() else None
    print(f"[demo]    logging.jsonl: {train_dir / 'logging.jsonl'}; torch_dist checkpoint: "
          f"{ckpt or '(none)'}")
    t = lap("train", t)

    export_dir = find_hf_export(train_dir)
    if export_dir is None:
        raise RuntimeError(f"training finished but wrote no HF export under {train_dir}")
    print(f"[demo] 6. exported HF safetensors: {export_dir}")
    acc_after, records = answer_accuracy(export_dir, data.val, device=device)
    print(f"[demo]    accuracy after training (transformers, exported dir): {acc_after:.2f} "
          f"(before {acc_before:.2f}, chance {chance:.2f})")
    right = next((r for r in records if r["correct"]), None)
    if right is not None:
        print(f"[demo]    e.g. {Path(right['image']).name}: {right['question'][7:]!r} -> "
              f"transformers generated {right['answer']!r}")
    t = lap("eval_after", t)

    ok = (acc_after >= MIN_ACCURACY and acc_after - chance >= MIN_GAIN_OVER_CHANCE
          and acc_after - acc_before >= MIN_GAIN_OVER_CHANCE)
    result = {
        "ok": ok, "accuracy_before": acc_before, "accuracy_after": acc_after,
        "chance": chance, "min_accuracy": MIN_ACCURACY, "min_gain": MIN_GAIN_OVER_CHANCE,
        "losses": losses, "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "model_type": family, "nproc": nproc, "device": device, "seconds": times,
        "total_seconds": round(time.time() - t0, 1),
        "paths": {"hf_init": str(hf_dir), "data": str(data.root), "train": str(train_dir),
                  "checkpoint": str(ckpt) if ckpt else None, "export": str(export_dir),
                  "logs": str(out / "logs")},
        "answers_after": records,
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=1))
    print(f"[demo] 7. results: {out / 'demo_result.json'}; done in {result['total_seconds']:.0f}s")
    if not ok:
        print(f"[demo] FAILED: accuracy after training {acc_after:.2f} is not far enough above "
              f"chance ({chance:.2f}) / before ({acc_before:.2f}); need >= {MIN_ACCURACY} and "
              f"a gain >= {MIN_GAIN_OVER_CHANCE}", file=sys.stderr)
        return 1
    return 0
