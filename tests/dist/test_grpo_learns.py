"""A tiny GRPO run learns an exact-match task, and the exported model answers better with
transformers (issue 12).

Tiny Qwen2 text model, fp32, one process, `mvlm rlhf --rlhf_type grpo` with an exact-match reward
from a plugin file (1 when the decoded completion equals the row's ``solution``, else 0). The
task is built from the starting model so that it is learnable in a few steps yet wrong at the
start: the ``solution`` of every prompt is one token that the model ranks 2nd to 10th, never
1st, for the first answer token of each prompt (transformers forward on the chat-templated
prompt); the completion is one token, sampled at top-k 10. At the start, greedy decoding
(transformers ``generate`` on the checkpoint) answers 0 of 4 prompts right by construction.
Asserted: the mean reward of the last 3 of 8 steps is at least step 1's + 0.4, and greedy
decoding of the exported model (``OUT/hf``) answers at least 3 of the 4 prompts right.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

PLUGIN = '''from swift.plugin import ORM, orms


class ExactMatch(ORM):
    def __call__(self, completions, solution, **kwargs):
        return [1.0 if c == s else 0.0 for c, s in zip(completions, solution)]


orms['exact_match'] = ExactMatch
'''
PROMPTS = ("Count to five.", "Name a colour.", "2+2?", "Say hi.")
TOP_K = 10


def _greedy(model_dir, prompts):
    """transformers: the greedy first answer token of each prompt, decoded; and the logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    answers, logits = [], []
    for q in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": q}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=1, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        answers.append(tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
        logits.append(out.logits[0][0])
    return answers, logits, tok


def _solution(model_dir):
    """The answer token: of the tokens no prompt answers greedily, the one with the best worst
    rank over the prompts (the tiny random model barely tells its prompts apart, so one answer
    for all is what a few steps can teach); its text must round-trip through the tokenizer."""
    import torch

    answers, logits, tok = _greedy(model_dir, PROMPTS)
    ranks = torch.stack([lg.argsort(descending=True).argsort() for lg in logits])
    for t in ranks.max(0).values.argsort().tolist():
        s = tok.decode([t], skip_special_tokens=True)
        if s and s not in answers and tok.encode(s, add_special_tokens=False) == [t]:
            return answers, s, ranks[:, t].tolist()
    raise AssertionError("no answer token")


def test_grpo_exact_match_learns(tmp_path, tiny_ckpt):
    hf = tiny_ckpt("qwen2")
    before, sol, ranks = _solution(hf)
    sols = [sol] * len(PROMPTS)
    print("answer", repr(sol), "ranks at the start", ranks)
    assert max(ranks) < TOP_K and sol not in before  # in every prompt's top-k, never greedy
    (tmp_path / "plugin.py").write_text(PLUGIN)
    data = tmp_path / "rl.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}],
                                        "solution": s}) + "\n" for q, s in zip(PROMPTS, sols)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mvlm", "rlhf", "--rlhf_type", "grpo", "--model", str(hf),
           "--dataset", str(data), "--external_plugins", str(tmp_path / "plugin.py"),
           "--reward_funcs", "exact_match", "--num_generations", "8",
           "--max_completion_length", "1", "--temperature", "1.0", "--top_k", str(TOP_K),
           "--top_p", "1.0", "--beta", "0", "--use_vllm", "false", "--torch_dtype", "float32",
           "--train_iters", "8", "--micro_batch_size", "2", "--global_batch_size", "2",
           "--lr", "5e-3", "--lr_decay_style", "constant", "--lr_warmup_iters", "0",
           "--max_length", "128", "--seed", "0", "--output_dir", str(out),
           "--save_final_checkpoint", "false", "--save_safetensors", "true",
           "--report_to", "none", "--disable_tqdm", "true"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    logs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    rewards = [x["reward"] for x in logs if "reward" in x]
    after, _, _ = _greedy(out / "hf", PROMPTS)
    right = sum(a == s for a, s in zip(after, sols))
    print("rewards", rewards, "solutions", sols, "before", before, "after", after)
    assert len(rewards) == 8
    assert sum(rewards[-3:]) / 3 >= rewards[0] + 0.4, rewards
    assert right >= 3, (after, sols)
