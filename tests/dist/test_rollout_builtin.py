"""The built-in rollout engine (``mvlm.rl.rollout.builtin``) against transformers and the trainer.

One torchrun launch (2 ranks, gloo, CPU, fp32) runs a text family (Qwen2, tied embeddings) and a
VLM family (Qwen2.5-VL; two of the three prompts carry an image of a different size, one is
text-only, all three of different lengths so left padding is exercised) at TP1 (two independent
engines), TP2 and PP2. Checked on every rank of every case:

* greedy decoding, plain and with ``repetition_penalty`` 1.3, equals transformers ``generate``
  token for token, and the engine's log-probs equal log_softmax of transformers' logits
  (bound 2e-6, measured 5.8e-7 worst over the cases);
* engine log-probs vs a full-sequence forward of prompt + completion without the KV cache (the
  trainer's view), temperature-scaled as TRL/ms-swift do: ``token_mult_prob_error`` = mean
  exp|dlogp| <= 1.0001 (measured 1.0000002) and max |dlogp| <= 2e-6 (measured 7.5e-7);
* sampling: the same seed gives the same completions on every call and on every rank; another
  seed gives other completions; the two generations of a prompt are not all identical;
  ``sampling_logprobs`` equal ``logprobs`` when no processor is active; top-k 1 equals greedy;
* a stop token taken from row 0's greedy output ends row 0 there (stop reason ``eos``) while the
  other rows continue unchanged to the length limit or their own stop;
* greedy only: TP2 with sequence parallelism (switched off for the call, restored after with
  train mode) and PP2 x VPP2 (Qwen2 has 4 layers here: one per virtual chunk);
* TP1/TP2: weights streamed out (``iter_hf_tensors``) and loaded back with ``load_weights`` after
  zeroing the model restore greedy output exactly.

A tile family rides the same launch (TP1, log-probs only): LLaVA-NeXT prompts (two images of
different sizes, text-only, one image) encoded by mvlm's template for RL, collated, and split per
prompt by ``mvlm.rl.media.split_media_rows`` as the GRPO objective does (any-resolution tiles:
placeholder counts that depend on the image size); the engine's sampled log-probs equal the
trainer's full-sequence forward on the same split media (same bounds as above; measured
token_mult_prob_error 1.0000002, max |dlogp| 5.0e-7; the case adds ~7 s per rank).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
T = 8
LAYOUTS = {"tp1": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}}
FAMILIES = ("qwen2", "qwen2_5_vl")
# greedy-only extra layouts (qwen2): sequence parallelism on, and the interleaved pipeline
EXTRA = {"tp2_sp": ({"tp": 2}, {"sp": True}), "pp2_vpp2": ({"pp": 2, "vpp": 2}, {})}
GREEDY_CASES = [f"{f}_{lay}" for f in FAMILIES for lay in LAYOUTS] + [
    f"qwen2_{lay}" for lay in EXTRA]


def _prompts(family: str, hf: Path) -> list[dict]:
    """Three prompts of different lengths; for the VLM two with images of different sizes."""
    if family == "qwen2":
        g = torch.Generator().manual_seed(0)
        return [{"input_ids": torch.randint(3, 400, (n,), generator=g).tolist()}
                for n in (5, 11, 8)]
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(hf)
    rng = np.random.default_rng(0)
    out = []
    for size, text in (((56, 84), "What colour is the shape?"),
                       (None, "Name a shape with four equal sides, please."),
                       ((56, 56), "What shape is it?")):
        content = ([{"type": "image"}] if size else []) + [{"type": "text", "text": text}]
        chat = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                        add_generation_prompt=True)
        imgs = [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))] \
            if size else None
        enc = proc(text=[chat], images=imgs, return_tensors="pt")
        p = {"input_ids": enc["input_ids"][0].tolist()}
        if size:
            p.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
        out.append(p)
    return out


def _tile_prompts(hf: Path) -> list[dict]:
    """LLaVA-NeXT RL prompts through template -> collator -> per-prompt split (the GRPO path)."""
    from PIL import Image
    from transformers import AutoConfig

    from mvlm.data.collate import collate_padded
    from mvlm.data.template import TemplateConfig, get_template
    from mvlm.models.registry import get_family
    from mvlm.rl.media import split_media_rows

    def _img(w: int, h: int, seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    tpl = get_template(hf, cfg=TemplateConfig(task="rl"))
    rows = [{"messages": [{"role": "user", "content": "Compare <image> and <image>."}],
             "images": [_img(120, 80, 0), _img(57, 190, 1)]},
            {"messages": [{"role": "user", "content": "Name a shape with four sides."}]},
            {"messages": [{"role": "user", "content": "<image>What shape is it?"}],
             "images": [_img(300, 300, 2)]}]
    batch = collate_padded([tpl.encode(r) for r in rows], pad_token_id=0)
    media = split_media_rows(batch, get_family("llava_next"), AutoConfig.from_pretrained(hf))
    lens = batch["attention_mask"].sum(-1).tolist()
    return [{"input_ids": batch["input_ids"][i, :n].tolist(), **m}
            for i, (n, m) in enumerate(zip(lens, media))]


def _hf_greedy(family: str, hf: Path, prompts: list[dict], rp: float) -> list[dict]:
    import transformers

    cls = transformers.AutoModelForCausalLM if family == "qwen2" else \
        transformers.AutoModelForImageTextToText
    model = cls.from_pretrained(hf, dtype=torch.float32).eval()
    refs = []
    for p in prompts:
        kw = {"input_ids": torch.tensor([p["input_ids"]])}
        if "pixel_values" in p:
            kw.update(pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"])
            kw["mm_token_type_ids"] = (kw["input_ids"] == model.config.image_token_id).int()
        with torch.no_grad():
            o = model.generate(**kw, max_new_tokens=T, do_sample=False, repetition_penalty=rp,
                               output_logits=True, return_dict_in_generate=True)
        ids = o.sequences[0, len(p["input_ids"]):].tolist()
        lp = [float(torch.log_softmax(lg[0].double(), -1)[t]) for lg, t in zip(o.logits, ids)]
        refs.append({"ids": ids, "lp": lp})
    return refs


@pytest.fixture(scope="module")
def rollout_run(tiny_ckpt, tmp_path_factory):
    from helpers import launch_worker

    tmp = tmp_path_factory.mktemp("rollout")
    cases, refs = {}, {}
    for fam in FAMILIES:
        # 4 layers so that PP2 x VPP2 has one layer per chunk
        hf = tiny_ckpt(fam, num_hidden_layers=4) if fam == "qwen2" else tiny_ckpt(fam)
        prompts = _prompts(fam, hf)
        torch.save(prompts, tmp / f"{fam}.pt")
        refs[fam] = {rp: _hf_greedy(fam, hf, prompts, rp) for rp in (1.0, 1.3)}
        for lay, layout in LAYOUTS.items():
            cases[f"{fam}_{lay}"] = {"hf": str(hf), "layout": layout,
                                     "prompts": str(tmp / f"{fam}.pt"),
                                     "max_completion_length": T}
        if fam == "qwen2":
            for lay, (layout, extra) in EXTRA.items():
                cases[f"{fam}_{lay}"] = {"hf": str(hf), "layout": layout, "greedy_only": True,
                                         "prompts": str(tmp / f"{fam}.pt"),
                                         "max_completion_length": T, **extra}
    hf = tiny_ckpt("llava_next")
    torch.save(_tile_prompts(hf), tmp / "llava_next.pt")
    cases["llava_next_tp1"] = {"hf": str(hf), "layout": {}, "logprobs_only": True,
                               "prompts": str(tmp / "llava_next.pt"), "max_completion_length": T}
    spec = {"out": str(tmp / "out.json"), "cases": cases}
    (tmp / "spec.json").write_text(json.dumps(spec))
    launch_worker(HERE / "_rollout_builtin_worker.py", 2, [tmp / "spec.json"], timeout=840,
                  expect=None, tail=11000)
    ranks = json.loads(Path(spec["out"]).read_text())
    print("seconds per case (rank 0):",
          {k: round(v["seconds"], 1) for k, v in ranks[0].items()})
    return ranks, refs


def _case_ranks(run, case):
    ranks, refs = run
    fam = next(f for f in FAMILIES if case.startswith(f + "_") and case[len(f) + 1:] in
               {**LAYOUTS, **EXTRA})
    return [r[case] for r in ranks], refs[fam]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", GREEDY_CASES)
def test_greedy_equals_transformers(rollout_run, case):
    ranks, refs = _case_ranks(rollout_run, case)
    if case.endswith("_sp"):
        for r in ranks:
            assert r["sp_before"][0] and sum(r["sp_before"]) > 4, r["sp_before"]
            assert r["sp_after"] == r["sp_before"]
            assert r["training_restored"]
    worst = 0.0
    for i, r in enumerate(ranks):
        for name, rp in (("greedy", 1.0), ("greedy_rep", 1.3)):
            for row, (got, want) in enumerate(zip(r[name], refs[rp])):
                assert got["ids"] == want["ids"], (case, i, name, row, got["ids"], want["ids"])
                assert got["stop"] == ("eos" if len(want["ids"]) < T else "length")
                d = max(abs(a - b) for a, b in zip(got["lp"], want["lp"]))
                worst = max(worst, d)
    assert worst <= 2e-6, (case, worst)
    print(f"{case}: greedy == transformers on {len(ranks)} ranks; max |logp - HF| {worst:.2e}")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", [f"{f}_{lay}" for f in FAMILIES for lay in LAYOUTS]
                         + ["llava_next_tp1"])
def test_logprobs_match_trainer_forward(rollout_run, case):
    if case == "llava_next_tp1":
        ranks = [r[case] for r in rollout_run[0]]
        assert all(r["placeholders"] for r in ranks)  # the engine saw image placeholders
    else:
        ranks, _ = _case_ranks(rollout_run, case)
    diffs = []
    for r in ranks:
        if not r["last_stage"]:
            assert all(t is None for t in r["trainer_lp"])
            continue
        for c, tl in zip(r["sampled"], r["trainer_lp"]):
            assert len(tl) == len(c["lp"]) == len(c["ids"])
            diffs += [abs(a - b) for a, b in zip(c["lp"], tl)]
    assert diffs
    mult = sum(math.exp(d) for d in diffs) / len(diffs)
    assert mult <= 1.0001, (case, mult)
    assert max(diffs) <= 2e-6, (case, max(diffs))
    print(f"{case}: token_mult_prob_error {mult:.8f}, max |dlogp| {max(diffs):.2e} over "
          f"{len(diffs)} tokens")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", [f"{f}_{lay}" for f in FAMILIES for lay in LAYOUTS])
def test_sampling_seeded_topk_eos(rollout_run, case):
    ranks, _ = _case_ranks(rollout_run, case)
    ids = lambda cs: [c["ids"] for c in cs]  # noqa: E731
    for r in ranks:
        assert ids(r["sampled"]) == ids(r["sampled_again"])
        assert ids(r["sampled"]) != ids(r["sampled_seed12"])
        pairs = [(ids(r["sampled"])[2 * j], ids(r["sampled"])[2 * j + 1]) for j in range(3)]
        assert any(a != b for a, b in pairs), pairs
        assert [c["prompt"] for c in r["sampled"]] == [0, 0, 1, 1, 2, 2]
        for c in r["sampled"]:
            assert max(abs(a - b) for a, b in zip(c["lp"], c["slp"])) <= 1e-12
        assert ids(r["topk1"]) == ids(r["greedy"])
        stop = r["stop_token"]
        assert stop is not None, "row 0's greedy output has no token absent from row 1"
        for row, (got, base) in enumerate(zip(r["eos_run"], r["greedy_rep"])):
            b = base["ids"]
            want = b[: b.index(stop) + 1] if stop in b else b
            assert got["ids"] == want, (case, row, got["ids"], want)
            assert got["stop"] == ("eos" if stop in b else base["stop"])
        assert r["eos_run"][0]["stop"] == "eos" and len(r["eos_run"][0]["ids"]) < T
        assert r["eos_run"][1]["ids"] == r["greedy_rep"][1]["ids"]
        if "reloaded" in r:
            assert r["version"] == 1
            assert ids(r["zeroed"]) == [[0, 0, 0]]  # all-zero weights: uniform logits
            assert ids(r["reloaded"]) == ids(r["greedy_rep"])
    if case.startswith("qwen2_5_vl"):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(ranks[0]["hf"])
        want = sorted({cfg.image_token_id, cfg.video_token_id})
    else:
        want = []
    assert all(r["placeholders"] == want for r in ranks), (ranks[0]["placeholders"], want)
    # every rank of the run drew the same tokens (TP: one group; TP1: same seed, same model)
    for name in ("sampled", "sampled_seed12", "topk1"):
        assert all(ids(r[name]) == ids(ranks[0][name]) for r in ranks), (case, name)
