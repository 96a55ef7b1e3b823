"""DPO with ``--ref_model DIR`` (issue 11): the reference is loaded from an HF directory.

Two launches (one rank; two ranks), full training of the tiny Qwen2-VL on two text pairs, steps
of both pairs:
* ``same``: the reference directory is the policy's own starting checkpoint, so step 1's loss is
  fp32 ln 2 exactly and the rewards are exactly 0 (the directory's weights were loaded, not a
  random init);
* ``other``: a checkpoint of the same architecture with other weights (seed 1): step 1's loss
  differs from ln 2 and equals the sigmoid DPO loss computed here from transformers' log-probs of
  both models (bound 1e-6; the reference's weights reach the loss);
* ``other_pre`` (one rank), ``other_tp2``, ``other_pre_pp2`` (two ranks): the same reference
  with ``--precompute_ref_log_probs`` and/or at TP2 / PP2: both steps equal ``other``'s;
* KTO (``--rlhf_type kto``, the pairs as one desirable and one undesirable row): ``kto_other``
  (one rank, reference ``other``): step 1's rewards equal beta x (policy - reference) log-probs of
  the rows' answers from transformers (the reference directory's weights reach KTO);
  ``kto_other_pre_tp2`` (two ranks: TP2 with ``--precompute_ref_log_probs``) equals it over 2
  steps (bound 1e-5);
* reward model beyond one rank: ``rm`` (one rank) and ``rm_pp2`` (PP2: the value head on the
  last stage, fed by the hidden states the first stage sent), 2 steps of Bradley-Terry on the two
  text pairs: every logged number equal (bound 1e-5);
* ``mismatch`` (last: the run fails): a Qwen2.5-VL reference for the Qwen2-VL policy is refused
  at set-up, before any step, with a message naming both; a same-family reference whose vocab
  differs is refused by :func:`check_reference_arch` naming the field and both values.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from test_dpo_objective import LN2_FP32, _kto_rows  # noqa: E402
from test_train_parity import common  # noqa: E402

BETA = 0.1
PAIRS = [{"messages": [{"role": "user", "content": "Capital of France?"}],
          "chosen": "Paris.", "rejected": "Rome."},
         {"messages": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}]


def _launch(runs: list[dict], tmp: Path, nproc: int = 1) -> dict:
    from helpers import free_port

    spec = {"runs": runs, "result": str(tmp / f"result{nproc}.json")}
    f = tmp / f"spec{nproc}.json"
    f.write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                        str(HERE / "_dpo_worker.py"), str(f)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert p.returncode == 0 and "WORKER OK" in p.stdout, (p.stdout + p.stderr)[-8000:]
    return json.loads(Path(spec["result"]).read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("dpo_ref")
    policy = tiny_ckpt("qwen2_vl")
    other = build_tiny_checkpoint("qwen2_vl", tmp / "other_hf", seed=1)
    data = tmp / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    kto_data = tmp / "kto.jsonl"
    kto_data.write_text("".join(json.dumps(r) + "\n" for r in _kto_rows(PAIRS)))

    def run(name: str, ref: Path | None, steps: int = 1, extra: tuple = (),
            rows: Path = data, **kw) -> dict:
        argv = common(policy, rows, tmp / name, steps=steps) + ["--global_batch_size", "2",
                                                                *extra]
        return {"name": name, "argv": argv, "out": str(tmp / name),
                **({"ref_model": str(ref)} if ref is not None else {}), **kw}

    kto = {"rows": kto_data, "objective": "kto", "steps": 2}
    rm = {"objective": "rm", "steps": 2, "extra": ("--lr", "5e-3")}
    res = _launch([run("same", policy), run("other", other, steps=2),
                   run("other_pre", other, steps=2, precompute=True),
                   run("kto_other", other, **kto), run("rm", None, **rm),
                   run("mismatch", tiny_ckpt("qwen2_5_vl"), expect_error=True)], tmp)
    two = _launch([run("other_tp2", other, steps=2, extra=("--tp", "2")),
                   run("other_pre_pp2", other, steps=2, extra=("--pp", "2"), precompute=True),
                   run("kto_other_pre_tp2", other, precompute=True, **kto | {"extra": (
                       "--tp", "2")}),
                   run("rm_pp2", None, **rm | {"extra": ("--lr", "5e-3", "--pp", "2")})],
                  tmp, nproc=2)
    logs = res["logs"] | two["logs"]
    return SimpleNamespace(tmp=tmp, policy=policy, other=other, data=data,
                           logs={k: [x for x in v if "loss" in x] for k, v in logs.items()},
                           errors=res["errors"])


def _hf_answer_logps(model_dir: Path, encs: list[dict]) -> torch.Tensor:
    """[pair, (chosen, rejected)] summed answer log-probs from transformers, fp32."""
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = torch.zeros(len(encs), 2, dtype=torch.float64)
    with torch.no_grad():
        for i, e in enumerate(encs):
            for j, pre in enumerate(("", "rejected_")):
                ids, labels = e[f"{pre}input_ids"].long(), e[f"{pre}labels"].long()
                logits = m(input_ids=ids[None]).logits[0, :-1].float()
                lp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
                out[i, j] = lp[labels[1:] >= 0].double().sum()
    return out


def test_ref_model_equal_to_policy_gives_ln2(setup):
    s0 = setup.logs["same"][0]
    print(json.dumps(s0))
    assert s0["loss"] == LN2_FP32, s0["loss"] - LN2_FP32
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert s0[k] == 0.0, (k, s0[k])


def test_other_ref_model_loss_matches_transformers(setup):
    from mvlm.data import preference as P
    from mvlm.data.template import TemplateConfig, get_template

    tpl = get_template(setup.policy, cfg=TemplateConfig(max_length=256, task="preference"))
    encs = [P.encode_pair(tpl, r) for r in PAIRS]
    pol, ref = _hf_answer_logps(setup.policy, encs), _hf_answer_logps(setup.other, encs)
    logits = BETA * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    want = float(-torch.nn.functional.logsigmoid(logits).mean())
    got = setup.logs["other"][0]
    print(f"other: loss {got['loss']!r}, transformers {want!r}, diff {got['loss'] - want:.2e}; "
          f"rewards/chosen {got['rewards/chosen']!r} vs "
          f"{float(BETA * (pol[:, 0] - ref[:, 0]).mean())!r}")
    assert abs(got["loss"] - math.log(2)) > 1e-3
    assert abs(got["loss"] - want) <= 1e-6
    assert abs(got["rewards/chosen"] - float(BETA * (pol[:, 0] - ref[:, 0]).mean())) <= 1e-5


DPO_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
            "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("name,tol", [("other_pre", 1e-6), ("other_tp2", 1e-5),
                                      ("other_pre_pp2", 1e-5)])
def test_ref_model_layouts_and_precompute_equal_one_rank(setup, name, tol):
    """--ref_model at TP2, and with --precompute_ref_log_probs (one pass of the reference
    before step 1, then no reference forward; at PP2 the stored log-probs live on the last
    stage): both steps' loss and metrics equal the one-rank on-the-fly run's (step 2 is the
    second epoch, the pairs reshuffled into other micro-batches)."""
    ref = setup.logs["other"]
    got = setup.logs[name]
    assert [x["step"] for x in got] == [x["step"] for x in ref] == [1, 2]
    worst = 0.0
    for a, b in zip(got, ref):
        for k in DPO_KEYS:
            d = abs(a[k] - b[k]) / max(1.0, abs(b[k]))
            worst = max(worst, d)
            assert d <= tol, (name, a["step"], k, a[k], b[k])
    print(f"{name} vs other: max relative difference {worst:.2e}")


def test_mismatched_ref_model_refused_before_training(setup, tiny_ckpt):
    msg = setup.errors["mismatch"]
    print(msg)
    assert msg is not None, "a Qwen2.5-VL reference for a Qwen2-VL policy was accepted"
    assert "--ref_model" in msg and "qwen2_5_vl" in msg and "qwen2_vl" in msg
    assert str(tiny_ckpt("qwen2_5_vl")) in msg
    assert not (setup.tmp / "mismatch" / "logging.jsonl").exists() or not any(
        "loss" in json.loads(x)
        for x in (setup.tmp / "mismatch" / "logging.jsonl").read_text().splitlines())


def test_vocab_mismatch_names_the_field(setup, tmp_path):
    from transformers import AutoConfig

    from mvlm.models.registry import get_family
    from mvlm.train.objectives.dpo import check_reference_arch

    cfg = AutoConfig.from_pretrained(setup.policy)
    family = get_family(cfg.model_type)
    policy = SimpleNamespace(hf_config=cfg, family=family, arch=family.text_arch(cfg))
    check_reference_arch(policy, str(setup.other))  # same architecture: accepted
    bad = AutoConfig.from_pretrained(setup.policy)
    for c in (bad, getattr(bad, "text_config", None)):
        if c is not None and hasattr(c, "vocab_size"):
            c.vocab_size = policy.arch.vocab_size + 64
    bad.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"--ref_model .*vocab_size \d+ vs \d+"):
        check_reference_arch(policy, str(tmp_path))


@pytest.mark.parametrize("argv,err", [
    (["--rlhf_type", "cpo", "--ref_model", "x"], "--ref_model has no effect with --rlhf_type cpo"),
    (["--rlhf_type", "orpo", "--ref_model", "x"], "--ref_model has no effect"),
    (["--ref_model", "x", "--reference_free", "true"], "--ref_model with --reference_free"),
])
def test_ref_model_flag_refused_where_unread(argv, err):
    from mvlm.train.preference_flags import cpo_loss_config, dpo_loss_config, orpo_beta
    from mvlm.train.rlhf import split_argv

    ns, _ = split_argv(argv)
    fn = {"dpo": dpo_loss_config, "cpo": cpo_loss_config, "orpo": orpo_beta}[ns.rlhf_type]
    with pytest.raises(ValueError, match=err):
        fn(ns)


KTO_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected", "kl")
RM_KEYS = ("loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected")


def test_kto_ref_model_rewards_match_transformers(setup):
    """KTO with --ref_model: step 1's rewards/chosen (the desirable row: pair 0's chosen answer)
    and rewards/rejected (the undesirable row: pair 1's rejected answer) are beta x (policy -
    reference) log-probs of those answers from transformers; the logged log-probs are the
    policy's."""
    from mvlm.data import preference as P
    from mvlm.data.template import TemplateConfig, get_template

    tpl = get_template(setup.policy, cfg=TemplateConfig(max_length=256, task="preference"))
    encs = [P.encode_pair(tpl, r) for r in PAIRS]
    pol, ref = _hf_answer_logps(setup.policy, encs), _hf_answer_logps(setup.other, encs)
    s1 = setup.logs["kto_other"][0]
    want = {"rewards/chosen": float(BETA * (pol[0, 0] - ref[0, 0])),
            "rewards/rejected": float(BETA * (pol[1, 1] - ref[1, 1])),
            "logps/chosen": float(pol[0, 0]), "logps/rejected": float(pol[1, 1])}
    print(json.dumps(s1), want)
    assert abs(want["rewards/chosen"]) > 1e-3 and abs(want["rewards/rejected"]) > 1e-3
    for k, v in want.items():
        assert abs(s1[k] - v) <= 1e-5 * max(1.0, abs(v)), (k, s1[k], v)


@pytest.mark.parametrize("name,ref,keys", [("kto_other_pre_tp2", "kto_other", KTO_KEYS),
                                           ("rm_pp2", "rm", RM_KEYS)])
def test_kto_and_rm_beyond_one_rank(setup, name, ref, keys):
    """KTO at TP2 with precomputed reference log-probs (--ref_model) and the reward model at
    PP2 equal their one-rank runs over 2 steps (bound 1e-5 relative, floor 1); the runs moved
    (step 2 differs from step 1)."""
    got, want = setup.logs[name], setup.logs[ref]
    assert [x["step"] for x in got] == [x["step"] for x in want] == [1, 2]
    assert want[1]["loss"] != want[0]["loss"]
    worst = 0.0
    for a, b in zip(got, want):
        for k in keys:
            d = abs(a[k] - b[k]) / max(1.0, abs(b[k]))
            worst = max(worst, d)
            assert d <= 1e-5, (name, a["step"], k, a[k], b[k])
    print(f"{name} vs {ref}: max relative difference {worst:.2e}")
