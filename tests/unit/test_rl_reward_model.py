"""GRPO's ``--reward_model DIR``: a reward-model export scores prompt + completion as one more
reward, weighted after ``--reward_funcs``; bad directories are refused while flags are parsed."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from mvlm.rl.flags import add_grpo_args, grpo_configs
from mvlm.rl.rewards import RewardConfig, build_rewards
from mvlm.testing.tiny_models import build_tokenizer

PROMPT = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
COMPLETIONS = ["<think>add</think><answer>5</answer><|im_end|>", "five, I think<|im_end|>",
               "<think>2+3</think> <answer>6</answer><|im_end|>"]


def _config(tok) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, num_labels=1)


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
    """A sequence-classification export and a value-head export (docs/preference.md layouts)."""
    root = tmp_path_factory.mktemp("rm")
    tok = build_tokenizer("qwen2")
    torch.manual_seed(0)
    seq = root / "my_rm"
    model = transformers.Qwen2ForSequenceClassification(_config(tok)).eval()
    model.save_pretrained(seq)
    tok.save_pretrained(seq)
    (seq / "reward_model.json").write_text(json.dumps({"head": "sequence_classification"}))
    vh = root / "vh_rm"
    lm = transformers.Qwen2ForCausalLM(_config(tok)).eval()
    lm.save_pretrained(vh)
    tok.save_pretrained(vh)
    head = torch.randn(1, 32)
    save_file({"score.weight": head}, str(vh / "value_head.safetensors"))
    (vh / "reward_model.json").write_text(json.dumps({"head": "value_head",
                                                      "file": "value_head.safetensors"}))
    return {"tok": tok, "seq": seq, "seq_model": model, "vh": vh, "lm": lm, "head": head}


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_reward_model_scores_equal_transformers_and_weights_combine(rm_dirs):
    tok = rm_dirs["tok"]
    p = _ids(tok, PROMPT)
    cs = [_ids(tok, c) for c in COMPLETIONS]
    texts = [PROMPT + c for c in COMPLETIONS]
    # the ids the reward model gets (prompt ids + completion ids) are the texts' own encoding
    assert [p + c for c in cs] == [_ids(tok, t) for t in texts]
    # references: transformers on the texts, batched and right-padded (last non-pad token)
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_seq = rm_dirs["seq_model"](**enc).logits[:, 0]
        hid = rm_dirs["lm"].model(**enc).last_hidden_state
        last = enc["attention_mask"].sum(-1) - 1
        ref_vh = hid[torch.arange(len(texts)), last] @ rm_dirs["head"][0]

    cfg = RewardConfig(reward_funcs=["format"],
                       reward_model=[str(rm_dirs["seq"]), str(rm_dirs["vh"])],
                       reward_weights=[0.5, 2.0, -1.0])
    rs = build_rewards(cfg)
    assert rs.names == ["format", "my_rm", "vh_rm"]
    # completions as GRPO passes them: decoded without special tokens; the ids keep <|im_end|>
    decoded = [c.removesuffix("<|im_end|>") for c in COMPLETIONS]
    res = rs(decoded, None, response_token_ids=cs, prompt_token_ids=[p] * 3)
    rpf = res.rewards_per_func
    assert rpf[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert torch.allclose(rpf[:, 1], ref_seq.float(), atol=1e-5, rtol=0)
    assert torch.allclose(rpf[:, 2], ref_vh.float(), atol=1e-5, rtol=0)
    assert len(set(rpf[:, 1].tolist())) == 3  # the scores depend on the completion
    expect = 0.5 * rpf[:, 0] + 2.0 * rpf[:, 1] - 1.0 * rpf[:, 2]
    assert torch.allclose(res.weighted(), expect, atol=1e-6, rtol=0)
    m = res.metrics()
    assert m["rewards/my_rm/mean"] == pytest.approx(float(ref_seq.mean()), abs=1e-5)
    assert m["rewards/vh_rm/mean"] == pytest.approx(float(ref_vh.mean()), abs=1e-5)

    with pytest.raises(ValueError, match=r"--reward_weights has 2 values for 3 reward functions "
                                         r"\(format, my_rm, vh_rm\)"):
        build_rewards(RewardConfig(reward_funcs=["format"],
                                   reward_model=[str(rm_dirs["seq"]), str(rm_dirs["vh"])],
                                   reward_weights=[1.0, 1.0]))
    # only a reward model is enough; without prompt ids it refuses rather than score half a text
    alone = build_rewards(RewardConfig(reward_model=[str(rm_dirs["seq"])]))
    assert alone.names == ["my_rm"]
    with pytest.raises(Exception, match="no prompt_token_ids"):
        alone(COMPLETIONS, None, response_token_ids=cs)
    with pytest.raises(Exception, match="outside its vocabulary"):
        alone(COMPLETIONS[:1], None, response_token_ids=[[len(tok) + 5]], prompt_token_ids=[p])


def _flags(argv: list[str]):
    p = argparse.ArgumentParser()
    add_grpo_args(p)
    ns = p.parse_args(argv)
    return grpo_configs(ns, num_generations=2, max_completion_length=16)


def test_bad_reward_model_dir_refused_at_flag_parsing(rm_dirs, tmp_path):
    ok = _flags(["--reward_funcs", "format", "--reward_model", str(rm_dirs["seq"]),
                 "--reward_weights", "1", "0.5"])
    assert ok.rewards.reward_model == [str(rm_dirs["seq"])]
    with pytest.raises(ValueError, match=r"--reward_model .*nope: no such directory"):
        _flags(["--reward_model", str(tmp_path / "nope")])
    plain = tmp_path / "plain_lm"  # an HF model, but not a reward-model export
    rm_dirs["lm"].save_pretrained(plain)
    with pytest.raises(ValueError, match=r"--reward_model .*plain_lm: not a reward model, "
                                         r"reward_model\.json missing"):
        _flags(["--reward_model", str(plain)])
    (plain / "reward_model.json").write_text(json.dumps({"head": "value_head",
                                                         "file": "value_head.safetensors"}))
    with pytest.raises(ValueError, match=r"value_head\.safetensors', which is missing"):
        _flags(["--reward_model", str(plain)])
    (plain / "reward_model.json").write_text(json.dumps({"head": "mystery"}))
    with pytest.raises(ValueError, match="head 'mystery', not sequence_classification"):
        _flags(["--reward_model", str(plain)])
    assert Path(plain / "config.json").is_file()
