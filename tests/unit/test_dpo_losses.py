"""mvlm.train.objectives.dpo_losses against TRL 1.16's own loss code on the same numbers.

TRL keeps its losses inside trainer methods that also run the model, so each test builds the
trainer object without its __init__ (``Trainer.__new__``), sets the attributes the method reads,
and hands it a stand-in model that returns fixed per-token log-probs (DPO, KTO), logits (CPO,
SimPO, ORPO) or rewards (RM). The same per-token numbers, summed per sequence, go into mvlm's
functions. Where TRL 1.16 has no implementation (conservative-DPO label smoothing on the sigmoid
loss), the paper's formula is transcribed here. Everything is fp32; bound 1e-6.
"""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mvlm.train.objectives import dpo_losses as dl

trl = pytest.importorskip("trl")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402

TOL = 1e-6
B, T = 6, 12


def _accel():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                           gather_for_metrics=lambda x: x, unwrap_model=lambda m: m)


def _stub(cls, **attrs):
    """A TRL trainer object without its __init__: only the attributes its loss code reads."""
    obj = cls.__new__(cls)
    obj.accelerator = _accel()
    obj.model = SimpleNamespace(training=True)
    obj._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    obj._total_train_tokens = 0
    obj._tp_size = 1
    obj.aux_loss_enabled = False
    for k, v in attrs.items():
        setattr(obj, k, v)
    return obj


def _completion_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, T] masks: a prompt of 2-5 tokens, then a completion of 1..T-prompt tokens."""
    m = torch.zeros(n, T, dtype=torch.long)
    for i in range(n):
        p = int(torch.randint(2, 6, (1,), generator=gen))
        c = int(torch.randint(1, T - p + 1, (1,), generator=gen))
        m[i, p:p + c] = 1
    return m


def _per_token(mask: torch.Tensor, gen: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    """Shifted per-token log-probs [n, T-1], zero where the (shifted) mask is 0 (TRL's fused
    LM head returns 0 on ignored labels)."""
    lp = -torch.rand(mask.shape[0], T - 1, generator=gen) * scale
    return lp * mask[:, 1:]


def _dpo_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    mask = _completion_mask(2 * B, gen)
    pol = _per_token(mask, gen)
    ref = pol + 0.7 * torch.randn(pol.shape, generator=gen) * mask[:, 1:]
    ref = ref.clamp(max=0)
    return mask, pol, ref


def _trl_dpo(mask, pol, ref, *, loss_types, loss_weights=None, beta=0.1, label_smoothing=0.0,
             discopop_tau=0.05):
    ref_sums = ref.sum(1)
    out = SimpleNamespace(log_probs=pol, entropy=torch.zeros_like(pol),
                          mean_logits=torch.zeros_like(pol),
                          is_top1=torch.zeros_like(pol, dtype=torch.bool))
    stub = _stub(DPOTrainer, beta=beta, precompute_ref_logps=True, loss_types=list(loss_types),
                 loss_weights=loss_weights or [1.0] * len(loss_types), ld_alpha=None,
                 f_divergence_type="reverse_kl", label_smoothing=label_smoothing,
                 use_weighting=False, args=SimpleNamespace(discopop_tau=discopop_tau))
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": mask,
              "completion_mask": mask, "ref_chosen_logps": ref_sums[:B],
              "ref_rejected_logps": ref_sums[B:]}
    loss = DPOTrainer._compute_loss(stub, lambda **kw: out, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def _mvlm_dpo(mask, pol, ref, cfg):
    s, r = pol.sum(1), ref.sum(1)
    n = mask[:, 1:].sum(1)
    return dl.dpo_loss(s[:B], s[B:], r[:B], r[B:], cfg, chosen_tokens=n[:B],
                       rejected_tokens=n[B:])


def _check_metrics(ours: dict, theirs: dict, names) -> None:
    for k in names:
        assert abs(ours[k] - theirs[k]) <= TOL * max(1.0, abs(theirs[k])), (k, ours[k], theirs[k])


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")
# (loss type, label smoothing) pairs: each loss type once, the smoothing-aware ones also smoothed
DPO_CASES = [(t, 0.0) for t in dl.DPO_LOSS_TYPES if t not in ("exo_pair",)] + [
    ("exo_pair", 1e-3), ("exo_pair", 0.2), ("robust", 0.1), ("aot", 0.1), ("aot_unpaired", 0.1)]


@pytest.mark.parametrize("loss_type,ls", DPO_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_loss_types_equal_trl(loss_type, ls, seed):
    mask, pol, ref = _dpo_case(seed)
    beta = 0.1 if seed == 0 else 0.5
    theirs, tm = _trl_dpo(mask, pol, ref, loss_types=[loss_type], beta=beta, label_smoothing=ls)
    cfg = dl.DPOLossConfig(beta=beta, loss_type=loss_type, label_smoothing=ls)
    res = _mvlm_dpo(mask, pol, ref, cfg)
    assert res.loss.dtype == torch.float32
    assert abs(float(res.loss) - float(theirs)) <= TOL * max(1.0, abs(float(theirs))), \
        (loss_type, float(res.loss), float(theirs))
    _check_metrics(dl.summarize_metrics(res.metrics), tm, DPO_METRICS)


def test_dpo_weighted_combination_and_rpo_alpha_equal_trl():
    """MPO-style weighted loss types, and rpo_alpha = TRL's ``sft`` term with that weight."""
    mask, pol, ref = _dpo_case(3)
    theirs, _ = _trl_dpo(mask, pol, ref, loss_types=["sigmoid", "bco_pair", "sft"],
                         loss_weights=[0.8, 0.2, 1.0])
    ours = _mvlm_dpo(mask, pol, ref, dl.DPOLossConfig(
        loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]))
    assert abs(float(ours.loss) - float(theirs)) <= TOL
    theirs, _ = _trl_dpo(mask, pol, ref, loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    ours = _mvlm_dpo(mask, pol, ref, dl.DPOLossConfig(rpo_alpha=0.5))
    assert abs(float(ours.loss) - float(theirs)) <= TOL
    assert ours.nll_weight == 0.5 and float(ours.nll_tokens) == float(mask[:B, 1:].sum())


def test_dpo_reference_free_equals_trl_with_zero_reference():
    mask, pol, ref = _dpo_case(4)
    zero = torch.zeros_like(ref)
    for lt in ("sigmoid", "ipo", "bco_pair"):
        theirs, tm = _trl_dpo(mask, pol, zero, loss_types=[lt])
        ours = _mvlm_dpo(mask, pol, ref, dl.DPOLossConfig(loss_type=lt, reference_free=True))
        assert abs(float(ours.loss) - float(theirs)) <= TOL, lt
        _check_metrics(dl.summarize_metrics(ours.metrics), tm, DPO_METRICS)


def test_dpo_sigmoid_label_smoothing_is_conservative_dpo():
    """TRL 1.16's sigmoid ignores label_smoothing; mvlm applies cDPO (what ms-swift's
    --label_smoothing did): -(1-e) log s(b d) - e log s(-b d), transcribed here."""
    mask, pol, ref = _dpo_case(5)
    s, r = pol.sum(1), ref.sum(1)
    beta, eps = 0.1, 0.01
    d = (s[:B] - r[:B]) - (s[B:] - r[B:])
    expect = torch.mean(-(1 - eps) * torch.log(torch.sigmoid(beta * d))
                        - eps * torch.log(torch.sigmoid(-beta * d)))
    ours = _mvlm_dpo(mask, pol, ref, dl.DPOLossConfig(beta=beta, label_smoothing=eps))
    assert abs(float(ours.loss) - float(expect)) <= TOL


@pytest.mark.parametrize("ls", [0.0, 0.01])
def test_step0_reference_equal_policy_gives_ln2_and_zero_rewards(ls):
    """Step-0 invariant: with reference == policy every log-ratio is 0, so sigmoid DPO is
    -log sigmoid(0) = ln 2 exactly in fp32 (also cDPO-smoothed: (1-e) ln2 + e ln2, within 1e-7),
    for every batch size 1..32 (an fp32 mean of 13 equal values is off by one ulp: the mean is
    taken in fp64), and every reward / margin is exactly 0 and no pair counts as accurate."""
    ln2 = torch.tensor(math.log(2.0), dtype=torch.float32)
    for n in range(1, 33):
        gen = torch.Generator().manual_seed(n)
        pc, pr = -torch.rand(n, generator=gen) * 30, -torch.rand(n, generator=gen) * 30
        res = dl.dpo_loss(pc, pr, pc.clone(), pr.clone(),
                          dl.DPOLossConfig(beta=0.1, label_smoothing=ls))
        assert res.loss.dtype == torch.float32
        if ls == 0.0:
            assert torch.equal(res.loss, ln2), (n, float(res.loss) - math.log(2))
        else:
            assert abs(float(res.loss) - math.log(2)) <= 1e-7, n
        m = dl.summarize_metrics(res.metrics)
        assert m["rewards/chosen"] == 0.0 and m["rewards/rejected"] == 0.0, n
        assert m["rewards/margins"] == 0.0 and m["rewards/accuracies"] == 0.0, n


def test_unknown_and_inconsistent_dpo_settings_are_refused():
    with pytest.raises(ValueError, match="choose from sigmoid, hinge, ipo") as e:
        dl.DPOLossConfig(loss_type="sigmoidd")
    assert "apo_down" in str(e.value) and "aot_pair = aot_unpaired" in str(e.value)
    assert dl.DPOLossConfig(loss_type="aot_pair").loss_type == ("aot_unpaired",)
    with pytest.raises(ValueError, match="exo_pair needs --label_smoothing"):
        dl.DPOLossConfig(loss_type="exo_pair")
    with pytest.raises(ValueError, match="no effect on loss type"):
        dl.DPOLossConfig(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="one weight per loss type"):
        dl.DPOLossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="beta must be > 0"):
        dl.DPOLossConfig(beta=0)
    with pytest.raises(ValueError, match="token counts are needed"):
        dl.dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2),
                    dl.DPOLossConfig(loss_type="ipo"))
    with pytest.raises(ValueError, match="CPO --loss_type 'kto' is unknown; choose from"):
        dl.CPOLossConfig(loss_type="kto")
    with pytest.raises(ValueError, match="KTO --loss_type 'sigmoid' is unknown; choose from"):
        dl.KTOLossConfig(loss_type="sigmoid")


# ----------------------------------------------------------------------------- CPO / SimPO / ORPO

def _logit_case(seed: int, vocab: int = 13):
    """Chosen / rejected token batches with prompts masked, and logits [2B, T, V]."""
    gen = torch.Generator().manual_seed(seed)
    mask = _completion_mask(2 * B, gen)
    ids = torch.randint(0, vocab, (2 * B, T), generator=gen)
    labels = ids.masked_fill(mask == 0, -100)
    logits = torch.randn(2 * B, T, vocab, generator=gen) * 2
    return mask, ids, labels, logits


def _sum_logps(logits, labels):
    lab = labels[:, 1:]
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    tok = lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (lab != -100)
    return tok.sum(1), (lab != -100).sum(1)


def _pair_batch(mask, ids, labels, *, attention=None):
    att = mask if attention == "completion" else torch.ones_like(mask)
    return {"chosen_input_ids": ids[:B], "chosen_attention_mask": att[:B],
            "chosen_labels": labels[:B], "rejected_input_ids": ids[B:],
            "rejected_attention_mask": att[B:], "rejected_labels": labels[B:]}


@pytest.mark.parametrize("loss_type,ls,alpha", [("sigmoid", 0.0, 1.0), ("sigmoid", 0.1, 0.0),
                                                ("hinge", 0.0, 1.0), ("ipo", 0.0, 0.5),
                                                ("simpo", 0.0, 0.0), ("simpo", 0.1, 1.0)])
def test_cpo_and_simpo_equal_trl(loss_type, ls, alpha):
    mask, ids, labels, logits = _logit_case(7)
    beta, gamma = 2.0 if loss_type == "simpo" else 0.1, 0.5
    stub = _stub(CPOTrainer, beta=beta, label_smoothing=ls, loss_type=loss_type, cpo_alpha=alpha,
                 simpo_gamma=gamma, alpha=0.0, is_encoder_decoder=False, pad_token_id=0)
    theirs, tm = CPOTrainer.get_batch_loss_metrics(
        stub, lambda *a, **kw: SimpleNamespace(logits=logits), _pair_batch(mask, ids, labels))
    s, n = _sum_logps(logits, labels)
    res = dl.cpo_loss(s[:B], s[B:], dl.CPOLossConfig(beta=beta, loss_type=loss_type,
                                                     label_smoothing=ls, cpo_alpha=alpha,
                                                     simpo_gamma=gamma),
                      chosen_tokens=n[:B], rejected_tokens=n[B:])
    assert abs(float(res.loss) - float(theirs)) <= TOL * max(1.0, abs(float(theirs)))
    names = list(DPO_METRICS) + (["nll_loss"] if alpha else [])
    _check_metrics(dl.summarize_metrics(res.metrics), tm, names)


def test_orpo_equals_trl():
    mask, ids, labels, logits = _logit_case(8)
    stub = _stub(ORPOTrainer, beta=0.25, is_encoder_decoder=False, padding_value=0)
    # prompt masked out of TRL's attention mask: TRL's NLL is then the response NLL (the paper's)
    theirs, tm = ORPOTrainer.get_batch_loss_metrics(
        stub, lambda *a, **kw: SimpleNamespace(logits=logits),
        _pair_batch(mask, ids, labels, attention="completion"))
    s, n = _sum_logps(logits, labels)
    res = dl.orpo_loss(s[:B], s[B:], 0.25, chosen_tokens=n[:B], rejected_tokens=n[B:])
    assert abs(float(res.loss) - float(theirs)) <= TOL
    tm = {k: float(v) for k, v in tm.items()}
    _check_metrics(dl.summarize_metrics(res.metrics), tm,
                   list(DPO_METRICS) + ["nll_loss", "log_odds_ratio", "log_odds_chosen"])


# ----------------------------------------------------------------------------- KTO

@pytest.mark.parametrize("loss_type", dl.KTO_LOSS_TYPES)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_trl(loss_type, weights):
    gen = torch.Generator().manual_seed(9)
    n = 2 * B
    mask = _completion_mask(n, gen)
    label = torch.tensor([True, False, True, True, False, True, False, False, True, True,
                          False, True])
    pol, ref = _per_token(mask, gen), _per_token(mask, gen)
    kl_mask = _completion_mask(n, gen)
    kl_pol, kl_ref = _per_token(kl_mask, gen), _per_token(kl_mask, gen)
    ids, kl_ids = torch.zeros(n, T, dtype=torch.long), torch.ones(n, T, dtype=torch.long)

    def model(input_ids, **kw):
        lp = kl_pol if input_ids is kl_ids else pol
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp),
                               mean_logits=torch.zeros_like(lp))

    stub = _stub(KTOTrainer, beta=0.1, loss_type=loss_type, desirable_weight=weights[0],
                 undesirable_weight=weights[1], precompute_ref_logps=True,
                 calculate_KL=loss_type == "kto")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(mask), "completion_mask": mask,
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_mask),
             "KL_completion_mask": kl_mask, "label": label, "ref_logps": ref.sum(1),
             "ref_KL_logps": kl_ref.sum(1)}
    theirs = KTOTrainer._compute_loss(stub, model, batch, return_outputs=False)
    tm = {k: v[-1] for k, v in stub._metrics["train"].items()}
    cfg = dl.KTOLossConfig(beta=0.1, loss_type=loss_type, desirable_weight=weights[0],
                           undesirable_weight=weights[1])
    kl = None
    if cfg.uses_kl:
        ks, kc = dl.kto_kl_estimate(kl_pol.sum(1), kl_ref.sum(1))
        kl = ks / kc
    res = dl.kto_loss(pol.sum(1), ref.sum(1), label, cfg, kl)
    assert abs(float(res.loss) - float(theirs)) <= TOL
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
             "logps/rejected"] + (["kl"] if cfg.uses_kl else [])
    _check_metrics(dl.summarize_metrics(res.metrics), tm, names)


@pytest.mark.parametrize("loss_type", dl.KTO_LOSS_TYPES)
def test_kto_objective_on_a_packed_row_equals_trl(monkeypatch, loss_type):
    """The Trainer objective (``--rlhf_type kto``): rows and their mismatched KL sequences packed
    as segment pairs of one row, the model output the per-token cross-entropy, the reference's
    per-segment log-probs attached -- its loss (sum / count, the Trainer's reduction) and
    metrics equal TRL's KTOTrainer on the same per-token log-probs."""
    from mvlm.train.objectives import base as base_mod
    from mvlm.train.objectives import dpo as dpo_mod
    from mvlm.train.objectives.kto import KTOObjective

    monkeypatch.setattr(base_mod, "cp_info", lambda: (1, 0, None))  # one rank, no process group
    gen = torch.Generator().manual_seed(12)
    n = 2 * B
    label = torch.rand(n, generator=gen) > 0.4
    mask, kl_mask = _completion_mask(n, gen), _completion_mask(n, gen)
    pol, ref = _per_token(mask, gen), _per_token(mask, gen)
    kl_pol, kl_ref = _per_token(kl_mask, gen), _per_token(kl_mask, gen)
    ids, kl_ids = torch.zeros(n, T, dtype=torch.long), torch.ones(n, T, dtype=torch.long)

    def model(input_ids, **kw):
        lp = kl_pol if input_ids is kl_ids else pol
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp),
                               mean_logits=torch.zeros_like(lp))

    stub = _stub(KTOTrainer, beta=0.1, loss_type=loss_type, desirable_weight=1.0,
                 undesirable_weight=1.33, precompute_ref_logps=True,
                 calculate_KL=loss_type == "kto")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(mask), "completion_mask": mask,
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_mask),
             "KL_completion_mask": kl_mask, "label": label, "ref_logps": ref.sum(1),
             "ref_KL_logps": kl_ref.sum(1)}
    theirs = KTOTrainer._compute_loss(stub, model, batch, return_outputs=False)
    tm = {k: v[-1] for k, v in stub._metrics["train"].items()}
    # mvlm's packed row: [answer_0, kl_0, answer_1, kl_1, ...], T-1 positions per segment
    seg_lp = torch.stack([pol, kl_pol], 1).reshape(1, -1)
    seg_mask = torch.stack([mask[:, 1:], kl_mask[:, 1:]], 1).reshape(1, -1)
    cu = torch.arange(0, 2 * n + 1, dtype=torch.int32) * (T - 1)
    packed = {"input_ids": torch.zeros_like(seg_mask), "cu_seqlens": cu,
              "position_ids": torch.zeros_like(seg_mask),
              "labels": torch.where(seg_mask.bool(), 1, -100),
              "chosen_index": torch.arange(0, 2 * n, 2), "rejected_index":
              torch.arange(1, 2 * n, 2), "kto_label": label,
              "ref_logps": torch.stack([ref.sum(1), kl_ref.sum(1)], 1).reshape(-1)}
    packed["seq_tokens"] = dpo_mod.sequence_tokens(packed)
    obj = KTOObjective(dl.KTOLossConfig(beta=0.1, loss_type=loss_type, desirable_weight=1.0,
                                        undesirable_weight=1.33))
    obj.check_batch(packed)
    loss_sum, count, reports = obj.loss(packed, -seg_lp)
    assert int(count) == n
    assert abs(float(loss_sum) / n - float(theirs)) <= TOL
    assert abs(float(reports["loss"][0] / reports["loss"][1]) - float(theirs)) <= TOL
    mine = {k: float(v[0] / v[1]) for k, v in reports.items() if k != "loss"}
    _check_metrics(mine, tm, list(obj.metrics[1:]))
    assert ("kl" in obj.metrics) == (loss_type == "kto")
    # a DPO objective refuses KTO rows, KTO refuses pairs: each names the fix
    with pytest.raises(ValueError, match="use --rlhf_type kto"):
        dpo_mod.DPOObjective(dl.DPOLossConfig()).check_batch(packed)
    with pytest.raises(ValueError, match="or use --rlhf_type dpo"):
        obj.check_batch({k: v for k, v in packed.items() if k != "kto_label"})


def test_kto_kl_is_clamped_and_required():
    cfg = dl.KTOLossConfig()
    with pytest.raises(ValueError, match="KL estimate"):
        dl.kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), cfg)
    res = dl.kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), cfg,
                      torch.tensor(-3.0))
    assert dl.summarize_metrics(res.metrics)["kl"] == 0.0
    assert torch.allclose(res.pair_losses, torch.full((2,), 0.5))  # 1 - sigmoid(0) each


# ----------------------------------------------------------------------------- reward model

@pytest.mark.parametrize("coef,with_margin", [(None, False), (0.01, False), (0.01, True)])
def test_reward_model_bradley_terry_equals_trl(coef, with_margin):
    gen = torch.Generator().manual_seed(10)
    rewards = torch.randn(2 * B, 1, generator=gen) * 2
    margin = torch.rand(B, generator=gen) if with_margin else None
    stub = _stub(RewardTrainer, args=SimpleNamespace(center_rewards_coefficient=coef))
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, T, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = margin
    theirs = RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=rewards),
                                        inputs)
    tm = {k: v[-1] for k, v in stub._metrics["train"].items()}
    r = rewards.squeeze(-1)
    res = dl.reward_model_loss(r[:B], r[B:], margin=margin, center_rewards_coefficient=coef)
    assert abs(float(res.loss) - float(theirs)) <= TOL
    _check_metrics(dl.summarize_metrics(res.metrics), tm, ["accuracy", "margin", "mean_reward"])


def test_metrics_reduce_over_micro_batches_like_one_batch():
    """(sum, count) metrics summed over two halves equal the metrics of the whole batch."""
    mask, pol, ref = _dpo_case(11)
    s, r = pol.sum(1), ref.sum(1)
    cfg = dl.DPOLossConfig(rpo_alpha=1.0)
    n = mask[:, 1:].sum(1)
    whole = dl.dpo_loss(s[:B], s[B:], r[:B], r[B:], cfg, chosen_tokens=n[:B],
                        rejected_tokens=n[B:])
    h = B // 2
    parts = [dl.dpo_loss(s[a:b], s[B + a:B + b], r[a:b], r[B + a:B + b], cfg,
                         chosen_tokens=n[a:b], rejected_tokens=n[B + a:B + b])
             for a, b in ((0, h), (h, B))]
    summed = {k: (parts[0].metrics[k][0] + parts[1].metrics[k][0],
                  parts[0].metrics[k][1] + parts[1].metrics[k][1]) for k in whole.metrics}
    a, b = dl.summarize_metrics(summed), dl.summarize_metrics(whole.metrics)
    for k in b:
        assert abs(a[k] - b[k]) <= TOL, k
    pair_sum = sum(float(p.pair_losses.sum()) for p in parts)
    nll = sum(float(p.nll_sum) for p in parts) / sum(float(p.nll_tokens) for p in parts)
    assert abs(pair_sum / B + nll - float(whole.loss)) <= TOL
