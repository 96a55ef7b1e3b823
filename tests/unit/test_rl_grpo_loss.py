"""mvlm.rl.grpo_loss against TRL 1.16's ``GRPOTrainer._compute_loss`` (called on a minimal
stand-in trainer: one process, one micro-batch, no gradient accumulation), the GSPO / rollout-IS
formulas written out here where TRL has no equivalent, split invariance over micro-batches, and the
step-0 invariant. fp32; loss, gradients and metrics within 1e-6."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mvlm.rl.grpo_loss import (
    GRPOLossConfig,
    LogprobMismatchError,
    LossDenominators,
    check_logprob_mismatch,
    grpo_loss,
    reduce_metrics,
    rollout_is_weights,
)

B, T = 8, 6
TOL = 1e-6


def _batch(seed: int = 0, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    old = logps + spread * torch.randn(B, T, generator=g)
    ref = logps + spread * torch.randn(B, T, generator=g)
    rollout = old + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.tensor([6, 1, 4, 6, 3, 5, 2, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    ent = torch.rand(B, T, generator=g)
    for x in (logps, old, ref, rollout):
        x.masked_fill_(mask == 0, -1e10)  # padding garbage must never reach exp()
    return logps, old, ref, rollout, adv, mask, ent


class _OneProcess:
    num_processes = 1

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    gather_for_metrics = gather


def _trl(cfg: GRPOLossConfig, logps, old, ref, adv, mask, ent, is_ratio=None):
    """TRL's own loss code on a stand-in ``self``; returns (loss, grad wrt logps, metrics)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    lp = logps.clone().requires_grad_(True)
    st = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, ent, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=cfg.importance_sampling_level, beta=cfg.beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1,
                             sapo_temperature_pos=cfg.tau_pos, sapo_temperature_neg=cfg.tau_neg),
        loss_type=cfg.loss_type, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=cfg.max_completion_length, accelerator=_OneProcess(),
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = GRPOTrainer._compute_loss(st, None, inputs)
    loss.backward()
    return loss.detach(), lp.grad, {k: v[-1] for k, v in st._metrics["train"].items()}


def _mine(cfg, logps, old, ref, adv, mask, ent=None, rollout=None):
    lp = logps.clone().requires_grad_(True)
    out = grpo_loss(lp, old, ref, adv, mask, cfg, LossDenominators.from_masks([mask]),
                    rollout_logps=rollout, entropies=ent)
    out.loss.backward()
    return out.loss.detach(), lp.grad, reduce_metrics([out])


def _cfg(loss_type: str, **kw) -> GRPOLossConfig:
    if loss_type == "cispo":
        kw.setdefault("epsilon_high", 1.1)  # low enough that some ratios are capped
    return GRPOLossConfig(loss_type=loss_type, max_completion_length=T, **kw)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_equals_trl(loss_type, level, beta):
    logps, old, ref, _, adv, mask, ent = _batch()
    kw = {} if loss_type == "cispo" else {"epsilon_high": 0.28}  # DAPO's clip-higher
    cfg = _cfg(loss_type, importance_sampling_level=level, beta=beta, **kw)
    want, gwant, mwant = _trl(cfg, logps, old, ref, adv, mask, ent)
    got, ggot, mgot = _mine(cfg, logps, old, ref, adv, mask, ent)
    assert abs(float(got - want)) <= TOL, (float(got), float(want))
    gm = mask.bool()
    assert torch.allclose(ggot[gm], gwant[gm], atol=TOL, rtol=0), (ggot - gwant).abs().max()
    assert torch.all(ggot[~gm] == 0)
    assert abs(mgot["entropy"] - mwant["entropy"]) <= TOL
    if beta:
        assert abs(mgot["kl"] - mwant["kl"]) <= TOL
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for mine, trl in (("low_mean", "low_mean"), ("high_mean", "high_mean"),
                          ("region_mean", "region_mean")):
            assert abs(mgot[f"clip_ratio/{mine}"] - mwant[f"clip_ratio/{trl}"]) <= TOL
        if level == "token":
            assert mgot["clip_ratio/region_mean"] > 0.05  # the inputs do exercise clipping
    if loss_type == "cispo":
        assert abs(mgot["clip_ratio/cispo"] - mwant["cispo_clip_ratio"]) <= TOL
        if level == "token":
            assert mgot["clip_ratio/cispo"] > 0.05


def test_gspo_token_equals_gspo_for_sequence_advantages():
    """GSPO paper: with one advantage per completion, GSPO-token has GSPO's value and gradient."""
    logps, old, ref, _, adv, mask, ent = _batch(seed=1)
    seq, tok = (_mine(_cfg("grpo", importance_sampling_level=lv), logps, old, ref, adv, mask)
                for lv in ("sequence", "sequence_token"))
    assert abs(float(seq[0] - tok[0])) <= TOL
    assert torch.allclose(seq[1], tok[1], atol=TOL, rtol=0)


def test_gspo_token_gradient_with_token_advantages():
    """d loss / d logp_{i,t} = -s_i * A_{i,t} / n_i / B where the sequence ratio s_i is inside
    the clip range (else 0 for the side the clip cuts), grpo reduction, beta 0."""
    logps, old, ref, _, _, mask, _ = _batch(seed=2, spread=0.05)
    adv = torch.randn(B, T, generator=torch.Generator().manual_seed(9))
    cfg = _cfg("grpo", importance_sampling_level="sequence_token", beta=0.0)
    _, grad, _ = _mine(cfg, logps, old, None, adv, mask)
    n = mask.sum(-1, keepdim=True)
    lr = ((logps - old).masked_fill(mask == 0, 0) * mask).sum(-1, keepdim=True) / n
    s = lr.exp()
    inside = (s > 1 - cfg.epsilon) & (s < 1 + cfg.epsilon_high)
    assert inside.all()  # small spread: every sequence ratio is unclipped
    want = (-s * adv / n / B) * mask
    assert torch.allclose(grad, want, atol=TOL, rtol=0), (grad - want).abs().max()


def _is_formula(old, rollout, mask, mode, thr):
    """ms-swift's rollout IS weights written out per element."""
    w = torch.zeros(B, T)
    for i in range(B):
        idx = [t for t in range(T) if mask[i, t] > 0]
        r = [math.exp(float(old[i, t] - rollout[i, t])) for t in idx]
        gm = math.exp(sum(math.log(x) for x in r) / len(r))
        for t, x in zip(idx, r):
            w[i, t] = {"token_truncate": min(x, thr), "token_mask": x if x <= thr else 0.0,
                       "sequence_truncate": min(gm, thr),
                       "sequence_mask": x if gm <= thr else 0.0}[mode]
    return w


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate",
                                  "sequence_mask"])
def test_rollout_importance_sampling(mode):
    logps, old, ref, rollout, adv, mask, ent = _batch(seed=3)
    thr = 1.3
    w = rollout_is_weights(old, rollout, mask, mode, thr)
    want_w = _is_formula(old, rollout, mask, mode, thr)
    assert torch.allclose(w, want_w, atol=TOL, rtol=1e-6), (w - want_w).abs().max()
    assert 0 < int((w[mask.bool()] == 0).sum()) or "truncate" in mode
    # applied to the loss: at beta 0 this is TRL's IS correction fed the same weights
    cfg = _cfg("dapo", beta=0.0, rollout_importance_sampling_mode=mode,
               rollout_importance_sampling_threshold=thr)
    want, gwant, _ = _trl(cfg, logps, old, ref, adv, mask, ent, is_ratio=want_w)
    got, ggot, m = _mine(cfg, logps, old, ref, adv, mask, rollout=rollout)
    assert abs(float(got - want)) <= TOL
    assert torch.allclose(ggot[mask.bool()], gwant[mask.bool()], atol=TOL, rtol=0)
    assert abs(m["rollout_is/weight_mean"] - float((want_w * mask).sum() / mask.sum())) <= TOL
    # with a KL term the weight multiplies it too (ms-swift's order)
    cfg_kl = _cfg("dapo", beta=0.1, rollout_importance_sampling_mode=mode,
                  rollout_importance_sampling_threshold=thr)
    got_kl = _mine(cfg_kl, logps, old, ref, adv, mask, rollout=rollout)[0]
    d = (ref - logps).masked_fill(mask == 0, 0)
    kl = (d.exp() - d - 1) * mask
    assert abs(float(got_kl - got) - float(0.1 * (kl * want_w).sum() / mask.sum())) <= TOL
    # the weights correct for the distribution the engine drew from when it is given
    # (sampling_logps); the mismatch metric keeps comparing the tempered log-probs
    sampled = rollout + 0.2
    lp = logps.clone().requires_grad_(True)
    out = grpo_loss(lp, old, ref, adv, mask, cfg, LossDenominators.from_masks([mask]),
                    rollout_logps=rollout, sampling_logps=sampled)
    want_s = _is_formula(old, sampled, mask, mode, thr)
    assert abs(float(out.loss) - float(_trl(cfg, logps, old, ref, adv, mask, ent,
                                            is_ratio=want_s)[0])) <= TOL
    assert abs(reduce_metrics([out])["token_mult_prob_error"]
               - float((old - rollout).abs()[mask.bool()].exp().mean())) <= TOL


def test_mismatch_metrics_and_stop():
    logps, old, ref, rollout, adv, mask, _ = _batch(seed=4)
    _, _, m = _mine(_cfg("grpo"), logps, old, ref, adv, mask, rollout=rollout)
    d = (old - rollout).abs()[mask.bool()]
    assert abs(m["token_mult_prob_error"] - float(d.exp().mean())) <= TOL
    assert abs(m["logp_abs_diff_max"] - float(d.max())) <= TOL
    check_logprob_mismatch(m, m["token_mult_prob_error"] + 1e-6)
    check_logprob_mismatch(m, None)
    with pytest.raises(LogprobMismatchError, match="--max_logprob_mismatch 1.0001"):
        check_logprob_mismatch(m, 1.0001)
    with pytest.raises(LogprobMismatchError):
        check_logprob_mismatch({"token_mult_prob_error": float("nan")}, 1.0001)
    # the same tokens scored identically: exactly 1
    _, _, m0 = _mine(_cfg("grpo"), logps, old, ref, adv, mask, rollout=old.clone())
    assert m0["token_mult_prob_error"] == 1.0 and m0["logp_abs_diff_max"] == 0.0


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_micro_batch_split_sums_to_whole(loss_type, level):
    """Any split over micro-batches / DP ranks gives the same loss, gradient and metrics, when
    every call gets the step's global denominators."""
    logps, old, ref, rollout, adv, mask, ent = _batch(seed=5)
    cfg = _cfg(loss_type, importance_sampling_level=level, beta=0.04,
               rollout_importance_sampling_mode="token_truncate")
    whole, gwhole, mwhole = _mine(cfg, logps, old, ref, adv, mask, ent, rollout)
    denoms = LossDenominators.from_masks([mask[:1], mask[1:4], mask[4:]])  # counted per piece
    lp = logps.clone().requires_grad_(True)
    outs = [grpo_loss(lp[s], old[s], ref[s], adv[s], mask[s], cfg, denoms,
                      rollout_logps=rollout[s], entropies=ent[s])
            for s in (slice(0, 1), slice(1, 4), slice(4, 8))]
    total = sum(o.loss for o in outs)
    total.backward()
    assert abs(float(total - whole)) <= TOL, (float(total), float(whole))
    assert torch.allclose(lp.grad, gwhole, atol=TOL, rtol=0)
    msplit = reduce_metrics(outs)
    assert msplit.keys() == mwhole.keys()
    for k in mwhole:
        assert abs(msplit[k] - mwhole[k]) <= TOL, k


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_step_zero_ratio_one_kl_zero(loss_type, level):
    """old == new == ref (first update after a rollout): ratio exactly 1, KL exactly 0, nothing
    clipped; the loss is the policy-gradient surrogate -A (cispo: -A * logp)."""
    logps, _, _, _, adv, mask, _ = _batch(seed=6)
    cfg = _cfg(loss_type, importance_sampling_level=level, beta=0.04)
    out = grpo_loss(logps.clone().requires_grad_(True), logps.clone(), logps.clone(), adv, mask,
                    cfg, LossDenominators.from_masks([mask]))
    m = reduce_metrics([out])
    assert m["ratio/max_abs_dev"] == 0.0 and m["ratio/mean"] == 1.0
    assert m["kl"] == 0.0
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
              "clip_ratio/cispo"):
        assert m.get(k, 0.0) == 0.0
    # on-policy (old_logps None) is the same step
    out2 = grpo_loss(logps.clone().requires_grad_(True), None, logps.clone(), adv, mask, cfg,
                     LossDenominators.from_masks([mask]))
    assert float(out2.loss) == float(out.loss)


def test_denominators_allreduce_over_a_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mask = torch.ones(3, 4)
        mask[0, 1:] = 0
        d = LossDenominators.from_masks([mask, mask[:1]], group=dist.group.WORLD)
        assert (d.num_tokens, d.num_sequences) == (10.0, 4.0)
        out = grpo_loss(torch.zeros(3, 4), None, None, torch.ones(3), mask,
                        _cfg("grpo", beta=0.0), d)
        assert reduce_metrics([out], group=dist.group.WORLD)["ratio/mean"] == 1.0
    finally:
        dist.destroy_process_group()


def test_padding_values_never_leak():
    """NaN/inf on padded positions (entropies, per-token advantages, log-probs) change nothing."""
    logps, old, ref, rollout, _, mask, ent = _batch(seed=7)
    adv = torch.randn(B, T, generator=torch.Generator().manual_seed(1))
    cfg = _cfg("grpo", beta=0.04, rollout_importance_sampling_mode="sequence_truncate")
    clean = _mine(cfg, logps, old, ref, adv, mask, ent, rollout)
    pad = mask == 0
    dirty = _mine(cfg, logps.masked_fill(pad, -float("inf")), old.masked_fill(pad, float("nan")),
                  ref.masked_fill(pad, float("inf")), adv.masked_fill(pad, float("nan")), mask,
                  ent.masked_fill(pad, float("nan")), rollout.masked_fill(pad, float("nan")))
    assert float(clean[0]) == float(dirty[0])
    assert torch.equal(clean[1], dirty[1]) and clean[2] == dirty[2]


def test_bad_input_names_the_flag():
    with pytest.raises(ValueError, match="--loss_type 'ppo'"):
        GRPOLossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="--importance_sampling_level 'seq'"):
        GRPOLossConfig(importance_sampling_level="seq")
    with pytest.raises(ValueError, match="--rollout_importance_sampling_mode 'clip'"):
        GRPOLossConfig(rollout_importance_sampling_mode="clip")
    with pytest.raises(ValueError, match="--epsilon_high"):
        GRPOLossConfig(loss_type="cispo")
    with pytest.raises(ValueError, match="--max_completion_length"):
        GRPOLossConfig(loss_type="dr_grpo")
    assert GRPOLossConfig(epsilon=0.1).epsilon_high == 0.1
    logps, old, _, _, adv, mask, _ = _batch()
    d = LossDenominators.from_masks([mask])
    with pytest.raises(ValueError, match="pass ref_logps .or --beta 0"):
        grpo_loss(logps, old, None, adv, mask, GRPOLossConfig(beta=0.1), d)
    grpo_loss(logps, old, None, adv, mask, GRPOLossConfig(beta=0.1, kl_in_reward=True), d)
    with pytest.raises(ValueError, match="rollout_logps / sampling_logps"):
        grpo_loss(logps, old, None, adv, mask,
                  GRPOLossConfig(beta=0.0, rollout_importance_sampling_mode="token_mask"), d)
    with pytest.raises(ValueError, match="3 advantages for 8 completions"):
        grpo_loss(logps, old, None, adv[:3], mask, GRPOLossConfig(beta=0.0), d)
