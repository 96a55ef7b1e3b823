"""GRPO through the Trainer (issue 12): tiny Qwen2 text model, fp32, CPU, built-in rollout engine.

Every run: 4 prompts, 3 optimizer steps of 2 prompts x 2 generations (2 micro-batches of one
prompt's group each), ``--num_iterations 2`` (step 2 trains on step 1's rollout again, step 3
rolls out the next prompts on the updated policy),
``--beta 0.04`` (frozen-copy reference), sampled at temperature 0.9 with a fixed seed, reward
``even_tokens`` (registered by the worker: fraction of even token ids). One rank (the reference,
and LoRA: the reference is the policy with its adapters off) and two ranks at TP2, PP2 and DP2
(DP2 samples other completions: each DP rank's engine has its own seed, so it is checked for
the invariants only); one rank also runs rloo with ``--loss_type dapo`` and token_truncate
rollout importance sampling.
Checked:

* step 1 on every layout: the policy is the rollout policy and the reference, so the ratio is 1
  and the KL 0 exactly (fp32), nothing is clipped; step 2 (same rollout, one update later) moves
  both; step 3 (a new rollout, first update on it) has ratio 1 exactly again, and a KL > 0
  to the reference;
* engine vs trainer log-probs of the sampled tokens (temperature-scaled, from the no-grad pass
  before the update): ``token_mult_prob_error`` <= 1.0001 (measured 1.0000003 worst,
  2026-12-04) and max |dlogp| <= 2e-6 (measured 9.5e-7) on every layout;
* TP2 and PP2 equal one rank over the 3 steps -- same completions (same rewards and lengths),
  losses, KL, ratio and clip metrics within 1e-6 (relative, floor 1; measured 1.0e-7);
* a run whose trainer tempers its log-probs unlike the engine stops on the first rollout with
  ``--max_logprob_mismatch``'s error;
* ``--num_iterations 2`` consumes the data once per rollout: the reusing step is handed the
  rollout's prompts again, and the 2 rollouts of 3 steps see every prompt of the file once;
* ``--dynamic_sample`` with a reward constant on one prompt (column ``flat``): the rollout
  holding it drops that group and rolls out more loader batches; every trained batch has
  reward std in every group; CHORD at mu 0.5: the step-1 loss is 0.5 x the plain run's GRPO loss
  + 0.5 x the SFT term, which equals ``mvlm sft``'s step-1 loss on the same expert rows;
* image prompts (tiny Qwen2-VL, the demo's shapes questions, with one text-only prompt so some
  micro-batches carry no image) at one rank and TP2: each prompt's ``pixel_values`` /
  ``image_grid_thw`` reach the engine and the training rows (mRoPE positions), the same
  invariants hold, and TP2 equals one rank; at DP2 the 2 rollouts cover the 4 prompts, so the
  rollout holding the text prompt trains one rank's micro-batch with an image while the other
  rank's has none (the vision tower's zero term keeps the DP gradient reduction in step);
* image prompts at CP2 (generation with CP switched off, log-probs gathered over CP) equal one
  rank over the 3 steps, with the step-1 invariants;
* a run stopped after step 1 (``--exit_interval 1``, mid-way through a rollout's 2 steps) and
  resumed equals the uninterrupted run exactly (rollout and repeat queue from the checkpoint,
  loader position = samples read); that checkpoint resumed at TP2 is refused;
* ``--dynamic_sample`` at DP2: the other rank rolls out with the rank that refills;
  ``consumed_samples`` grows by a global batch per rollout drawn;
* a learning run on image prompts (8 rollouts): the reward rises.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from test_train_parity import common  # noqa: E402

LAYOUTS = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"]}  # CP2: vl_cp2 (image prompts)
GRPO = {"num_generations": 2, "max_completion_length": 6, "temperature": 0.9, "top_k": 50,
        "top_p": 0.9, "num_iterations": 2, "beta": 0.04, "reward_funcs": ["even_tokens"]}
LEARN_STEPS = 8
LEARN = {**GRPO, "num_generations": 8, "max_completion_length": 4, "temperature": 1.0,
         "top_p": 1.0, "num_iterations": 1, "beta": 0}
COMPARED = ("loss", "kl", "ratio/mean", "entropy", "clip_ratio/region_mean", "reward", "reward_std",
            "completions/mean_length", "token_mult_prob_error")


def _launch(runs: list[dict], nproc: int, tmp: Path, name: str) -> dict:
    from helpers import launch_worker

    spec = {"runs": runs, "result": str(tmp / f"{name}.json")}
    f = tmp / f"{name}_spec.json"
    f.write_text(json.dumps(spec))
    launch_worker(HERE / "_grpo_worker.py", nproc, [f], timeout=840, tail=8000)
    res = json.loads(Path(spec["result"]).read_text())
    out = {k: [x for x in v if "loss" in x] for k, v in res["logs"].items()}
    out.update({f"error:{k}": v for k, v in res["errors"].items()})
    out.update({f"prompts:{k}": v for k, v in res["prompts"].items()})
    return out


def _vl_data(root: Path) -> Path:
    """RL rows of the demo's shapes task (image + question, ``solution``) and one text-only row,
    so that some micro-batches carry no image."""
    from mvlm.demo_data import write_demo_dataset

    demo = write_demo_dataset(root / "demo", n_train=3, n_val=1, image_size=56, seed=3)
    rows = []
    for x in demo.train.read_text().splitlines():
        r = json.loads(x)
        rows.append({"messages": r["messages"][:1], "solution": r["messages"][1]["content"],
                     "images": [str((demo.train.parent / p).resolve()) for p in r["images"]]})
    rows.insert(1, {"messages": [{"role": "user", "content": "Say hi."}], "solution": "hi"})
    f = root / "vl_rl.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _out(argv: list[str], out: Path) -> list[str]:
    i = argv.index("--output_dir")
    return argv[:i + 1] + [str(out)] + argv[i + 2:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("grpo")
    hf, vl_hf = tiny_ckpt("qwen2"), tiny_ckpt("qwen2_vl")
    vl_data = _vl_data(tmp)
    data = tmp / "rl.jsonl"
    # `flat`: a column only the dynamic-sample run's reward reads (constant reward there)
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}],
                                        "flat": q == "Say hi."}) + "\n"
                            for q in ("Count to five.", "Name a colour.", "2+2?", "Say hi.")))

    def run(name: str, extra: list[str], grpo: dict | None = None, vl: bool = False) -> dict:
        argv = common(vl_hf if vl else hf, vl_data if vl else data, tmp / name, steps=3) + [
            "--micro_batch_size", "1", "--global_batch_size", "2", "--lr", "1e-3"] + extra
        return {"name": name, "argv": argv, "out": str(tmp / name), "grpo": grpo or GRPO}

    bad = run("mismatch", [], {**GRPO, "max_logprob_mismatch": 1.001})
    bad["trainer_temperature"] = 0.5  # the engine samples at 0.9
    lora = ["--train_type", "lora", "--lora_rank", "4", "--lora_dropout", "0", "--lr", "1e-2"]
    rloo = run("rloo", [], {**GRPO, "advantage_estimator": "rloo", "loss_type": "dapo",
                            "rollout_importance_sampling_mode": "token_truncate"})
    # CHORD, mu = 0.5 throughout; the expert file's 2 rows are one expert micro-batch
    expert = tmp / "expert.jsonl"
    expert.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in (("Count to five.", "1 2 3 4 5"), ("Say hi.", "hi"))))
    chord_flags = {**GRPO, "chord_sft_dataset": str(expert), "chord_mu_peak": 0.5,
                   "chord_mu_valley": 0.5, "chord_sft_per_device_train_batch_size": 2}
    chord = run("chord", ["--train_iters", "1"], chord_flags)
    sft = {"name": "sft", "sft": True, "out": str(tmp / "sft"), "argv": common(
        hf, expert, tmp / "sft", steps=1) + ["--micro_batch_size", "2", "--global_batch_size",
                                            "2"]}
    dyn = run("dyn", [], {**GRPO, "reward_funcs": ["flat_or_even"], "dynamic_sample": "true",
                          "max_resample_times": 3})
    # stopped after step 1 (mid-way through the rollout reused by step 2), then resumed
    res_stop = dict(run("res", ["--exit_interval", "1"]), name="res_stop")
    # a learning run on the image prompts only: 8 rollouts, 8 completions of 4 tokens each
    img_data = tmp / "vl_images.jsonl"
    img_data.write_text("".join(x + "\n" for x in vl_data.read_text().splitlines()
                                if json.loads(x).get("images")))
    learn = run("vl_learn", ["--dataset", str(img_data), "--train_iters", str(LEARN_STEPS),
                             "--lr", "5e-3", "--lr_decay_style", "constant",
                             "--lr_warmup_iters", "0"], LEARN, vl=True)
    one = _launch([run("ref", []), run("lora", lora), rloo, bad, run("vl", [], vl=True), chord,
                   sft, dyn, res_stop, run("res", []), learn], 1, tmp, "one")
    two = _launch([run(k, v) for k, v in LAYOUTS.items()] + [
        run("dp2", []), run("vl_tp2", ["--tp", "2"], vl=True), run("vl_dp2", [], vl=True),
        run("chord_tp2", ["--tp", "2", "--train_iters", "1"], chord_flags),
        run("chord_pp2", ["--pp", "2", "--train_iters", "1"], chord_flags),
        # the mid-rollout checkpoint of the one-rank "res" run, resumed at TP2: refused
        dict(run("res_tp2", ["--tp", "2", "--resume", str(tmp / "res" / "checkpoint-1")]),
             expect_error=True),
        run("vl_cp2", ["--cp", "2"], vl=True), dict(dyn, name="dyn_dp2", out=str(tmp / "dyn_dp2"),
                                                   argv=_out(dyn["argv"], tmp / "dyn_dp2"))],
        2, tmp, "two")
    return one | two | {"vl_hf": str(vl_hf)}


ALL = ["ref", "lora", "rloo", *LAYOUTS, "dp2", "vl", "vl_tp2", "vl_cp2", "vl_dp2", "dyn",
       "dyn_dp2"]


@pytest.mark.parametrize("name", ALL)
def test_step0_ratio_one_kl_zero(runs, name):
    s1, s2, s3 = runs[name]
    print(name, json.dumps(runs[name], indent=1))
    assert s1["ratio/mean"] == 1.0 and s1["kl"] == 0.0, (s1["ratio/mean"], s1["kl"])
    assert s1["clip_ratio/region_mean"] == 0.0
    assert 0.0 < s1["entropy"] < 6.91  # at most log 1000: the tiny model has 1000 tokens
    # step 2 trains on step 1's rollout (--num_iterations 2) after one update
    assert s2["time/rollout_s"] == 0.0 and s2["reward"] == s1["reward"]
    assert s2["kl"] > 0.0 and s2["ratio/mean"] != 1.0
    # step 3: a fresh rollout on the updated policy; its first update has ratio 1 again
    assert s3["time/rollout_s"] > 0.0 and s3["ratio/mean"] == 1.0 and s3["kl"] > 0.0


@pytest.mark.parametrize("name", ALL)
def test_engine_matches_trainer(runs, name):
    for s in runs[name]:
        print(f"{name} step {s['step']}: token_mult_prob_error {s['token_mult_prob_error']!r}, "
              f"max |dlogp| {s['logp_abs_diff_max']:.3g}")
        assert 1.0 <= s["token_mult_prob_error"] <= 1.0001
        assert s["logp_abs_diff_max"] <= 2e-6


@pytest.mark.parametrize("name", [*LAYOUTS, "vl_tp2", "vl_cp2"])
def test_layouts_equal_one_rank(runs, name):
    worst = (0.0, "", 0)
    base = "vl" if name.startswith("vl_") else "ref"
    for a, b in zip(runs[name], runs[base], strict=True):
        assert a["completions/mean_length"] == b["completions/mean_length"]
        for k in COMPARED:
            d = abs(a[k] - b[k]) / max(1.0, abs(b[k]))
            worst = max(worst, (d, k, a["step"]))
            assert d <= 1e-6, (name, a["step"], k, a[k], b[k])
    print(f"{name} vs {base}: max relative difference {worst[0]:.2e} ({worst[1]}, step {worst[2]})")


def test_rloo_kl_in_reward_rollout_is(runs):
    """rloo (KL as a reward penalty by default: the reference pass feeds the advantages), dapo
    token-mean, token_truncate rollout IS: the weight is old/engine, 1 within the mismatch."""
    for s in runs["rloo"]:
        assert abs(s["rollout_is/weight_mean"] - 1.0) <= 1e-6, s["rollout_is/weight_mean"]
        assert s["rollout_is/clipped_frac"] == 0.0


def test_mismatch_stops_the_run(runs):
    """Trainer log-probs tempered at 0.5 while the engine samples at 0.9: the first rollout's
    check stops the run (before any update) with a message naming the metric and the flag."""
    msg = runs["error:mismatch"]
    assert "token_mult_prob_error" in msg and "--max_logprob_mismatch 1.001" in msg, msg


@pytest.mark.parametrize("name", ["ref", "dp2"])
def test_num_iterations_repeats_prompts(runs, name):
    """--num_iterations 2: the step reusing a rollout gets the rollout's prompts again (TRL's
    RepeatSampler order), so the two rollouts of the 3 steps see the 4 prompts of the file once
    each on one rank (DP2: each rank its own prompt per rollout, 2 per rank)."""
    s1, s2, s3 = (s["prompts"] for s in runs[f"prompts:{name}"])
    assert s1 == s2 and s3 != s1, (s1, s2, s3)
    seen = [tuple(p) for p in s1 + s3]
    assert len(set(seen)) == len(seen) == (2 if name == "dp2" else 4), seen



def test_resume_mid_rollout_equals_uninterrupted(runs):
    """--num_iterations 2, stopped by --exit_interval 1 after step 1 and resumed: step 2 reuses
    the checkpointed rollout (and gets its prompts from the checkpointed repeat queue), step 3
    reads the loader where the uninterrupted run does and samples with the same engine seeds:
    steps 2 and 3 equal the uninterrupted run's exactly."""
    ref, res = runs["ref"], [s for s in runs["res"] if s["step"] > 1]
    assert [s["step"] for s in res] == [2, 3]
    assert [s["consumed_samples"] for s in ref] == [2, 2, 4]  # one global batch per rollout
    for a, b in zip(res, ref[1:], strict=True):
        for k in (*COMPARED, "consumed_samples", "grad_norm", "ratio/mean"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    assert runs["prompts:res"] == runs["prompts:ref"][1:]
    # that checkpoint holds the reused rollout of one layout: another layout refuses it
    msg = runs["error:res_tp2"]
    assert "checkpoint-1 was saved while a batch was being reused" in msg and \
        "resume it on that layout" in msg, msg


def test_image_prompts_learn(runs):
    """A multimodal GRPO learning run (tiny Qwen2-VL, the shapes task's image prompts only, each
    training row carrying its image): the reward (``even_tokens``, the fraction of even token
    ids of the completion) rises over 8 rollouts on the updated policy (8 completions of
    4 tokens per prompt, 2 prompts per step)."""
    tok = json.loads((Path(runs["vl_hf"]) / "config.json").read_text())["image_token_id"]
    steps, seen = runs["vl_learn"], runs["prompts:vl_learn"]
    rewards = [s["reward"] for s in steps]
    print("vl_learn rewards", rewards)
    assert len(rewards) == LEARN_STEPS and all(s["time/rollout_s"] > 0 for s in steps)
    assert all(tok in p for s in seen for p in s["prompts"])
    assert [s["images"] for s in seen] == [LEARN["num_generations"] * len(s["prompts"])
                                           for s in seen]
    last = sum(rewards[-3:]) / 3
    assert last >= rewards[0] + 0.25 and last >= 0.85, rewards  # measured 0.56 -> 0.91


@pytest.mark.parametrize("name", ["vl", "vl_tp2"])
def test_image_rows_reach_training(runs, name):
    """Each training row (prompt + completion) of an image prompt carries that prompt's image:
    images per step = --num_generations x the step's prompts holding the image token; the
    text-only prompt's rows carry none (its micro-batch has no media keys)."""
    tok = json.loads((Path(runs["vl_hf"]) / "config.json").read_text())["image_token_id"]
    steps = runs[f"prompts:{name}"]
    with_img = [sum(tok in p for p in s["prompts"]) for s in steps]
    assert [s["images"] for s in steps] == [GRPO["num_generations"] * n for n in with_img]
    assert 0 < min(with_img) and max(with_img) == len(steps[0]["prompts"]) > min(with_img)


def test_chord_mixes_the_sft_loss(runs):
    """CHORD at mu = 0.5: step 1 rolls out exactly as the plain run (same policy, seeds, prompts),
    so its loss is 0.5 x the plain run's GRPO loss + 0.5 x the SFT token mean of the expert
    batch, and that SFT term equals `mvlm sft`'s step-1 loss on the same 2 rows."""
    (c,), ref, sft = runs["chord"], runs["ref"][0], runs["sft"]
    sft1 = next(x for x in sft if "loss" in x)["loss"]
    print(f"chord loss {c['loss']!r}, ref {ref['loss']!r}, sft term {c['chord/sft_loss']!r}, "
          f"mvlm sft {sft1!r}")
    assert c["chord/mu"] == 0.5 and c["reward"] == ref["reward"]
    assert abs(c["chord/sft_loss"] - sft1) <= 1e-6 * sft1
    assert abs(c["loss"] - (0.5 * ref["loss"] + 0.5 * c["chord/sft_loss"])) <= 1e-6


@pytest.mark.parametrize("name", ["dyn", "dyn_dp2"])
def test_dynamic_sample_through_the_trainer(runs, name):
    """--dynamic_sample with a reward that is constant on the prompt "Say hi." (column `flat`):
    the rollout that holds it drops that group and rolls out further loader batches until 2
    groups with signal are kept, so every trained batch has reward std in every group. At DP2
    the rank that holds the prompt refills while the other rank rolls out with it (one decision
    for all ranks); every further batch drawn is counted in ``consumed_samples`` (a resume
    reopens the loader after them)."""
    steps, prompts = runs[name], runs[f"prompts:{name}"]
    for s in steps:
        print({k: v for k, v in s.items()
               if k.startswith("dynamic_sample/") or k == "frac_reward_zero_std"})
    assert sum(s["dynamic_sample/dropped_groups"] for s in steps[::2]) >= 1
    for s in steps[::2]:  # the rollout steps (step 2 reuses step 1's)
        assert s["frac_reward_zero_std"] == 0.0 and s["dynamic_sample/zero_std_groups_used"] == 0
        assert (s["dynamic_sample/rollouts"] > 1) == (s["dynamic_sample/dropped_groups"] > 0)
    assert prompts[0]["prompts"] == prompts[1]["prompts"]  # reuse gets the rollout's prompts
    gbs = 2
    assert steps[0]["consumed_samples"] == gbs * steps[0]["dynamic_sample/rollouts"]
    assert steps[1]["consumed_samples"] == steps[0]["consumed_samples"]
    assert steps[2]["consumed_samples"] == steps[1]["consumed_samples"] + \
        gbs * steps[2]["dynamic_sample/rollouts"]


def test_vl_dp2_text_prompt_beside_an_image(runs):
    """DP2 with image prompts: the 2 rollouts cover the file's 4 prompts (3 images, 1 text; the
    --num_iterations test shows the coverage), so one rollout has a rank without images beside
    a rank with one; the run finished with the invariants above, and rank 0's rows carry
    exactly their prompts' images."""
    tok = json.loads((Path(runs["vl_hf"]) / "config.json").read_text())["image_token_id"]
    steps = runs["prompts:vl_dp2"]
    assert [len(s["prompts"]) for s in steps] == [1, 1, 1]
    assert [s["images"] for s in steps] == [
        GRPO["num_generations"] * sum(tok in p for p in s["prompts"]) for s in steps]


@pytest.mark.parametrize("name", ["chord_tp2", "chord_pp2"])
def test_chord_layouts_equal_one_rank(runs, name):
    """CHORD at TP2 (the expert batch's vocab-parallel cross-entropy) and PP2 (the expert rows
    and the GRPO rows padded to one length for the stages' exchange): the mixed loss and the SFT
    term equal one rank's (<= 1e-6 relative)."""
    (a,), (b,) = runs[name], runs["chord"]
    for k in ("loss", "chord/sft_loss", "chord/mu", "reward"):
        assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])), (k, a[k], b[k])
    print(name, "vs one rank:", {k: abs(a[k] - b[k]) for k in ("loss", "chord/sft_loss")})
