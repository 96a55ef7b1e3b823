"""Multimodal GRPO learns: the demo's shapes task, a short SFT warm start, then GRPO (issue 12).

    .venv/bin/python bench/grpo_shapes.py [--sft_iters 60] [--grpo_iters 40] [--record]

One run, every step through the commands a user types:

1. the demo's tiny random Qwen2.5-VL checkpoint and coloured-shapes dataset (``mvlm.demo``:
   ``DEMO_MODEL``, ``DEMO_IMAGE_SIZE``, ``write_demo_dataset``), chance accuracy printed;
2. a deliberately short SFT warm start, ``torchrun --nproc-per-node 2 -m mvlm sft ... --tp 2``
   (the demo's command line with fewer steps), so the model answers in the task's format and is
   above chance but far from perfect -- the room GRPO needs to show anything; held-out
   exact-match accuracy measured with transformers on its HF export (``answer_accuracy``);
3. GRPO from that export, ``torchrun ... -m mvlm rlhf --rlhf_type grpo --use_vllm false``, on
   image prompts made from the train rows (the user turn kept, the answer moved to a ``solution``
   column) with an exact-match reward from an ``--external_plugins`` file in the ms-swift guide's
   ORM style (``from swift.plugin import ORM, orms``: runs without ms-swift installed);
4. held-out accuracy with transformers on the GRPO export, and the reward curve from its
   ``logging.jsonl``;
5. a table: accuracy after the warm start vs after GRPO, chance, first/last mean reward (means
   over the first and last ``--window`` steps, since one step's reward is a mean over few
   prompts), and the margins. ``--record`` appends it to ``docs/benchmarks.md``.

Exit status 1 when the held-out accuracy did not improve. A benchmark, not a CI test: it takes
minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from mvlm.demo import (
    DEMO_IMAGE_SIZE,
    DEMO_MODEL,
    DemoConfig,
    _torchrun,
    answer_accuracy,
    find_hf_export,
    sft_args,
)

# The guide's plugin style (§8.2): an ORM subclass registered by name. Whitespace is stripped
# because the completion may carry the chat template's newline; special tokens are not decoded.
PLUGIN = '''from swift.plugin import ORM, orms


class ShapesExactMatch(ORM):
    """1.0 when the completion is exactly the expected word, else 0.0."""

    def __call__(self, completions, solution, **kwargs):
        return [1.0 if c.strip() == s.strip() else 0.0 for c, s in zip(completions, solution)]


orms['shapes_exact_match'] = ShapesExactMatch
'''


def write_rl_rows(train_jsonl: Path, out_jsonl: Path) -> int:
    """RL rows from SFT rows: the user turn (with its ``<image>`` tag and image) is the prompt,
    the assistant's answer becomes the ``solution`` column the reward function receives."""
    rows = []
    for line in train_jsonl.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        user, answer = row["messages"][0], row["messages"][1]["content"]
        rows.append({"messages": [user], "images": row["images"], "solution": answer})
    out_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def grpo_args(model: Path, data: Path, plugin: Path, out: Path, a: argparse.Namespace,
              nproc: int) -> list[str]:
    """The `mvlm rlhf --rlhf_type grpo` command line (ms-swift flag names)."""
    return ["rlhf", "--rlhf_type", "grpo", "--model", str(model), "--dataset", str(data),
            "--external_plugins", str(plugin), "--reward_funcs", "shapes_exact_match",
            "--num_generations", str(a.num_generations), "--max_completion_length", "4",
            "--temperature", str(a.temperature), "--top_p", "1.0", "--top_k", str(a.top_k),
            "--beta", str(a.beta), "--use_vllm", "false", "--torch_dtype", "float32",
            "--train_iters", str(a.grpo_iters), "--micro_batch_size", str(a.grpo_prompts),
            "--global_batch_size", str(a.grpo_prompts * nproc),
            "--lr", f"{a.grpo_lr:g}", "--lr_decay_style", "constant", "--lr_warmup_iters", "0",
            "--weight_decay", "0.0", "--clip_grad", "1.0", "--max_length", "256",
            "--freeze_vit", "false", "--freeze_aligner", "false",
            "--seed", str(a.seed), "--output_dir", str(out),
            "--save_final_checkpoint", "false", "--save_safetensors", "true",
            "--report_to", "none", "--disable_tqdm", "true"]


def read_rewards(logging_jsonl: Path) -> list[float]:
    return [float(r["reward"]) for r in
            (json.loads(x) for x in logging_jsonl.read_text().splitlines() if x.strip())
            if "reward" in r]


def table(res: dict) -> str:
    w = res["window"]
    rows = [("held-out accuracy, SFT warm start (transformers)", f"{res['acc_sft']:.3f}"),
            ("held-out accuracy, after GRPO (transformers)", f"{res['acc_grpo']:.3f}"),
            ("accuracy margin (GRPO - SFT)", f"{res['acc_grpo'] - res['acc_sft']:+.3f}"),
            ("chance", f"{res['chance']:.3f}"),
            (f"mean reward, first {w} GRPO steps", f"{res['reward_first']:.3f}"),
            (f"mean reward, last {w} GRPO steps", f"{res['reward_last']:.3f}"),
            ("reward margin (last - first)", f"{res['reward_last'] - res['reward_first']:+.3f}"),
            ("held-out rows", str(res["n_val"])),
            ("wall s: build / SFT / eval / GRPO / eval",
             " / ".join(str(res["seconds"][k]) for k in
                        ("build", "sft", "eval_sft", "grpo", "eval_grpo")))]
    lines = ["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    curve = " ".join(f"{r:.2f}" for r in res["rewards"])
    return "\n".join(lines) + f"\n\nReward per GRPO step: {curve}\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="/tmp/mvlm_grpo_shapes")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--sft_iters", type=int, default=60)
    p.add_argument("--sft_lr", type=float, default=3e-3)
    p.add_argument("--grpo_iters", type=int, default=40)
    p.add_argument("--grpo_prompts", type=int, default=8, help="prompts per rank per step")
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--grpo_lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--n_train", type=int, default=480)
    p.add_argument("--n_val", type=int, default=96)
    p.add_argument("--window", type=int, default=5, help="steps averaged for first/last reward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    a = p.parse_args()

    from mvlm.demo_data import chance_accuracy, write_demo_dataset
    from mvlm.models.registry import get_family
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    out = Path(a.output_dir).resolve()
    shutil.rmtree(out, ignore_errors=True)  # fresh runs: the trainer would resume otherwise
    (out / "logs").mkdir(parents=True)
    secs: dict[str, float] = {}
    t = time.time()

    def lap(name: str) -> None:
        nonlocal t
        secs[name] = round(time.time() - t, 1)
        t = time.time()

    family = "qwen2_5_vl"
    hf_init = build_tiny_checkpoint(family, out / "hf_init", seed=a.seed, **DEMO_MODEL,
                                    **get_family(family).tiny_spec().demo_overrides)
    data = write_demo_dataset(out / "data", n_train=a.n_train, n_val=a.n_val,
                              image_size=DEMO_IMAGE_SIZE, seed=a.seed)
    chance = chance_accuracy(data.kinds)
    rl_rows = data.root / "rl_train.jsonl"
    write_rl_rows(data.train, rl_rows)
    plugin = out / "shapes_plugin.py"
    plugin.write_text(PLUGIN)
    lap("build")

    cfg = DemoConfig(train_iters=a.sft_iters, lr=a.sft_lr, seed=a.seed, nproc=a.nproc)
    sft_dir = out / "sft"
    _torchrun(a.nproc, sft_args(hf_init, data.train, sft_dir, a.nproc, cfg),
              out / "logs" / "sft.log")
    sft_export = find_hf_export(sft_dir)
    if sft_export is None:
        raise RuntimeError(f"`mvlm sft` wrote no HF export under {sft_dir}")
    lap("sft")
    acc_sft, _ = answer_accuracy(sft_export, data.val)
    print(f"[grpo_shapes] SFT warm start ({a.sft_iters} steps): held-out accuracy "
          f"{acc_sft:.3f} (chance {chance:.3f})", flush=True)
    lap("eval_sft")

    grpo_dir = out / "grpo"
    _torchrun(a.nproc, grpo_args(sft_export, rl_rows, plugin, grpo_dir, a, a.nproc),
              out / "logs" / "grpo.log")
    rewards = read_rewards(grpo_dir / "logging.jsonl")
    lap("grpo")
    grpo_export = grpo_dir / "hf"
    acc_grpo, records = answer_accuracy(grpo_export, data.val)
    lap("eval_grpo")

    w = min(a.window, max(1, len(rewards) // 2))
    res = {"acc_sft": acc_sft, "acc_grpo": acc_grpo, "chance": chance, "rewards": rewards,
           "reward_first": sum(rewards[:w]) / w, "reward_last": sum(rewards[-w:]) / w,
           "window": w, "n_val": data.n_val, "seconds": secs, "args": vars(a),
           "answers_after": records}
    (out / "result.json").write_text(json.dumps(res, indent=1))
    cmd = "python bench/grpo_shapes.py " + " ".join(sys.argv[1:])
    tab = table(res)
    print(tab)
    print(f"[grpo_shapes] result: {out / 'result.json'}")
    if a.record:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        section = (f"\n## Multimodal GRPO on the shapes task (bench/grpo_shapes.py, {day}, "
                   f"2-core {platform.machine()} CPU shared with other jobs, no GPU)\n\n"
                   f"`{cmd.strip()}` -- tiny Qwen2.5-VL (demo model), {a.nproc} ranks (SFT at "
                   f"TP{a.nproc}, GRPO at DP{a.nproc}); SFT warm start {a.sft_iters} steps at lr "
                   f"{a.sft_lr:g}; GRPO {a.grpo_iters} steps, {a.grpo_prompts * a.nproc} image "
                   f"prompts x {a.num_generations} completions per step, temperature "
                   f"{a.temperature:g}, top-k {a.top_k}, beta {a.beta:g}, lr {a.grpo_lr:g}, "
                   f"exact-match reward from an `--external_plugins` ORM file, "
                   f"`--use_vllm false`. Accuracy: greedy answers of transformers on each HF "
                   f"export over {data.n_val} held-out rows.\n\n"
                   + tab)
        bench_md = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        with open(bench_md, "a") as f:
            f.write(section)
        print(f"[grpo_shapes] appended to {bench_md}")
    if acc_grpo <= acc_sft:
        print(f"[grpo_shapes] FAILED: held-out accuracy did not improve ({acc_sft:.3f} -> "
              f"{acc_grpo:.3f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
