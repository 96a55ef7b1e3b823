"""`mvlm rlhf --rlhf_type cpo | simpo | orpo` (issue 11): the first step's logged loss and metrics
equal the method's loss computed from transformers' log-probs of the same pairs.

Each method trains one step (one rank, full training, 4 pairs of the guide's format, images and
text) through the real command. The oracle: the tiny checkpoint loaded by transformers scores
every chosen / rejected sequence (sum of log-softmax at the answer labels), and
mvlm.train.objectives.dpo_losses -- held equal to TRL by tests/unit/test_dpo_losses.py -- turns
those numbers into the expected loss. This checks the command, the flags' defaults (SimPO: beta
2.0, loss type simpo, cpo_alpha 1), encoding, packing, the per-segment log-probs and the global
NLL token mean against an independent forward. Bound: 2e-6 relative (floor 1; measured 4.8e-7).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_dpo_objective import _rows  # noqa: E402
from test_train_parity import common  # noqa: E402

TOL = 2e-6  # measured 4.8e-7 (simpo), 2.1e-7, 3.6e-7


def _hf_scores(model_dir: Path, rows: list[dict], root: Path):
    """(summed answer log-probs, answer token counts) of [chosen..., rejected...] under HF."""
    import transformers

    from mvlm.data import preference as P
    from mvlm.data.collate import collate_padded
    from mvlm.data.template import get_template
    from mvlm.models.registry import get_family

    tmpl = get_template(model_dir)
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    fam = get_family(cfg.model_type)
    hf = getattr(transformers, fam.hf_model_class).from_pretrained(
        model_dir, dtype=torch.float32).eval()
    lps, ns = [], []
    seqs = [P.pair_sequences(e) for e in P.encode_preference_rows(tmpl, rows, str(root))]
    for which in (0, 1):
        for pair in seqs:
            b = collate_padded([pair[which]], tmpl.pad_token_id)
            with torch.no_grad():
                logits = hf(**fam.hf_forward_inputs(cfg, b)).logits.float()[0]
            lab = b["labels"][0]
            keep = lab != -100
            lp = torch.log_softmax(logits, -1)[keep].gather(-1, lab[keep][:, None])[:, 0]
            lps.append(lp.sum())
            ns.append(float(keep.sum()))
    k = len(rows)
    lps, ns = torch.stack(lps), torch.tensor(ns)
    return lps[:k], lps[k:], ns[:k], ns[k:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("pairs")
    rows = _rows(tmp)
    data = tmp / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_ckpt("qwen2_vl")
    return tmp, model, data, _hf_scores(model, rows, tmp)


def _run(tmp: Path, model: Path, data: Path, method: list[str]) -> dict:
    out = tmp / method[1]
    argv = common(model, data, out, steps=1) + ["--micro_batch_size", "2",
                                                "--global_batch_size", "4"]
    p = subprocess.run([sys.executable, "-m", "mvlm", "rlhf", *method, *argv],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    logs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    return [x for x in logs if "loss" in x][0]


def _check(step: dict, expect, names) -> None:
    from mvlm.train.objectives.dpo_losses import summarize_metrics

    want = {"loss": float(expect.loss), **summarize_metrics(expect.metrics)}
    rel = {k: abs(step[k] - want[k]) / max(1.0, abs(want[k])) for k in names}
    print("max relative difference vs the transformers oracle:", max(rel.values()))
    for k in names:
        assert rel[k] <= TOL, (k, step[k], want[k])


PAIR = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("method", ["simpo", "cpo", "orpo"])
def test_first_step_equals_the_loss_on_transformers_logps(setup, method):
    from mvlm.train.objectives import dpo_losses as dl

    tmp, model, data, (pc, pr, nc, nr) = setup
    if method == "orpo":
        step = _run(tmp, model, data, ["--rlhf_type", "orpo", "--beta", "0.2"])
        expect = dl.orpo_loss(pc, pr, 0.2, chosen_tokens=nc, rejected_tokens=nr)
        names = PAIR + ("nll_loss", "log_odds_ratio", "log_odds_chosen")
    elif method == "simpo":  # ms-swift's defaults: beta 2.0, simpo_gamma 1.0, cpo_alpha 1.0
        step = _run(tmp, model, data, ["--rlhf_type", "simpo"])
        cfg = dl.CPOLossConfig(beta=2.0, loss_type="simpo", simpo_gamma=1.0, cpo_alpha=1.0)
        expect = dl.cpo_loss(pc, pr, cfg, chosen_tokens=nc, rejected_tokens=nr)
        names = PAIR + ("nll_loss",)
    else:
        step = _run(tmp, model, data, ["--rlhf_type", "cpo", "--label_smoothing", "0.1",
                                       "--cpo_alpha", "0.5"])
        cfg = dl.CPOLossConfig(beta=0.1, loss_type="sigmoid", label_smoothing=0.1,
                               cpo_alpha=0.5)
        expect = dl.cpo_loss(pc, pr, cfg, chosen_tokens=nc, rejected_tokens=nr)
        names = PAIR + ("nll_loss",)
    print(method, {k: step[k] for k in names})
    _check(step, expect, names)
