"""Rollout benchmark: the built-in engine's tokens/s against transformers ``generate``.

Same random Qwen2 checkpoint (built locally), same prompts, same process, same run:

* greedy: B prompts of mixed lengths, one completion each;
* sampled: the same prompts, ``num_generations`` completions each (temperature 1), which is what
  GRPO asks for: the engine prefills each prompt once and repeats its KV cache, transformers'
  ``num_return_sequences`` expands the prompts before the prefill.

Both sides decode in one left-padded batch with a KV cache; EOS is suppressed on both sides so
every row produces exactly ``--max_completion_length`` tokens. tokens/s = generated tokens /
seconds of the generate call, wall and CPU time of this process (best of ``--repeats``, after
one warm-up, the two sides alternating). The greedy completions are also compared token for
token (they must match).

    python bench/rollout.py [--record]
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def interleaved(fns: list, repeats: int) -> list[tuple[float, float, object]]:
    """(best wall s, best CPU s of this process, last output) per function. One warm-up each,
    then the functions alternate, so a load change on a shared machine hits both alike; CPU
    time (all threads of this process) is what other jobs on the box disturb least."""
    for fn in fns:
        fn()
    best = [[float("inf"), float("inf"), None] for _ in fns]
    for _ in range(repeats):
        for b, fn in zip(best, fns):
            w, c = time.perf_counter(), time.process_time()
            b[2] = fn()
            b[0] = min(b[0], time.perf_counter() - w)
            b[1] = min(b[1], time.process_time() - c)
    return [tuple(b) for b in best]


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The model/prompt/repeat flags both rollout benchmarks share (bench/vllm_rollout.py too),
    so their numbers describe the same workload."""
    ap.add_argument("--workdir", default="/tmp/mvlm_bench_rollout")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--num_generations", type=int, default=4)
    ap.add_argument("--max_completion_length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--record", action="store_true", help="append to docs/benchmarks.md")


def tiny_qwen2(workdir: str, hidden: int, layers: int) -> Path:
    """The random Qwen2-shaped checkpoint (built once per shape, then reused)."""
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    hf = Path(workdir) / f"qwen2_h{hidden}_l{layers}"
    if not (hf / "config.json").exists():
        build_tiny_checkpoint("qwen2", hf, hidden_size=hidden, num_hidden_layers=layers,
                              intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
                              num_key_value_heads=2)
    return hf


def random_prompts(n: int) -> list[list[int]]:
    """``n`` prompts of 16-64 random token ids, drawn with seed 0."""
    g = torch.Generator().manual_seed(0)
    lens = [int(x) for x in torch.randint(16, 65, (n,), generator=g)]
    return [torch.randint(3, 900, (m,), generator=g).tolist() for m in lens]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    args = ap.parse_args()

    import transformers
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.models.vlm import build_model
    from mvlm.rl.rollout.base import RolloutPrompt, SamplingParams
    from mvlm.rl.rollout.builtin import BuiltinRolloutEngine
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    hf = tiny_qwen2(args.workdir, args.hidden, args.layers)
    ctx = startup(ParallelLayout(), device=None, seed=0)
    device = ctx.device
    bundle = build_model(AutoConfig.from_pretrained(hf), ParallelLayout(), dtype=torch.float32,
                         device=device, perform_initialization=False)
    load_hf_weights(bundle, hf)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        hf, dtype=torch.float32).to(device).eval()
    gcfg = hf_model.generation_config
    eos = [gcfg.eos_token_id] if isinstance(gcfg.eos_token_id, int) else list(gcfg.eos_token_id)
    pad = int(gcfg.pad_token_id)

    prompts = random_prompts(args.prompts)
    P, T = max(len(p) for p in prompts), args.max_completion_length
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    engine = BuiltinRolloutEngine(bundle, eos, pad_token_id=pad)
    rows = []
    for mode, n in (("greedy", 1), ("sampled", args.num_generations)):
        sp = SamplingParams(num_generations=n, max_completion_length=T,
                            temperature=0.0 if mode == "greedy" else 1.0, seed=0,
                            suppress_token_ids=eos)

        def eng_gen(sp=sp):
            return engine.generate([RolloutPrompt(p) for p in prompts], sp)

        def hf_gen(n=n, mode=mode):
            with torch.no_grad():
                return hf_model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=T, min_new_tokens=T,
                    do_sample=mode == "sampled", temperature=1.0, top_k=None, top_p=None,
                    num_return_sequences=n, pad_token_id=pad, suppress_tokens=eos)
        (w_eng, c_eng, groups), (w_hf, c_hf, out) = interleaved([eng_gen, hf_gen], args.repeats)
        n_eng = sum(len(c.token_ids) for gr in groups for c in gr.completions)
        n_hf = (out.shape[1] - P) * out.shape[0]
        same = None
        if mode == "greedy":
            same = all(c.token_ids == out[i, P:].tolist()
                       for i, gr in enumerate(groups) for c in gr.completions)
        rows.append((mode, n, n_eng / w_eng, n_hf / w_hf, n_eng / c_eng, n_hf / c_hf, same))

    dev_name = torch.cuda.get_device_name() if device == "cuda" else \
        f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python bench/rollout.py" + (" --record" if args.record else "")
    lines = [f"Command: `{cmd}` ({when}, {device}: {dev_name}; Qwen2-shaped random model, "
             f"hidden {args.hidden}, {args.layers} layers, fp32; {args.prompts} prompts of "
             f"16-64 tokens, {T} new tokens per completion, EOS suppressed on both sides)", "",
             "| mode | completions | built-in tokens/s (wall) | transformers tokens/s (wall) | "
             "ratio (wall) | ratio (CPU time) | greedy tokens identical |",
             "|---|---|---|---|---|---|---|"]
    for mode, n, r_eng, r_hf, rc_eng, rc_hf, same in rows:
        lines.append(f"| {mode} | {args.prompts} x {n} | {r_eng:.0f} | {r_hf:.0f} | "
                     f"{r_eng / r_hf:.2f}x | {rc_eng / rc_hf:.2f}x | "
                     f"{'-' if same is None else same} |")
    print("\n".join(lines))
    if any(same is False for *_, same in rows):
        raise SystemExit("greedy completions differ between the engine and transformers")
    if args.record:
        doc = REPO / "docs" / "benchmarks.md"
        doc.write_text(doc.read_text().rstrip("\n") + "\n\n## Built-in rollout engine vs "
                       "transformers generate\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
