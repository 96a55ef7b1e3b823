"""`mvlm export --merge_lora true|false` of LoRA/DoRA runs trained at TP2 (ms-swift's
`swift export --adapters CKPT --merge_lora true`).

Two LoRA-family runs of `mvlm sft` on the tiny Qwen2-VL at TP2 (two ranks, fp32, 2 steps, images
and text): LoRA (all-linear, r=4) and DoRA (r=4, lm_head in --modules_to_save). Their checkpoints
hold adapters + optimizer only; the base weights come from the run's base model, which the
checkpoint records. Exports at both layouts, under torchrun and on one plain rank:

* LoRA -> PEFT dir at TP2 (torchrun, ``--adapters CKPT``), LoRA -> merged HF at TP1;
* DoRA -> merged HF at TP2 (torchrun), DoRA -> PEFT dir at TP1;
* LoRA -> merged HF at PP2 (torchrun; the run's latest checkpoint via its output_dir).

Each export is compared with the trained model (restored by the trainer's own resume code at TP2):
transformers on the merged dir, and peft.PeftModel.from_pretrained on the base HF model for the
PEFT dir, on text / one-image / two-image inputs; max |dlogits| <= 1e-5 (fp32). The base model is
moved away before the TP1 exports, so they must name --model BASE_HF_DIR; also checked: a
missing --merge_lora on an adapter checkpoint, --merge_lora on a full-weight checkpoint, an
existing output without --overwrite (left untouched) and with it (replaced, with --verify:
the written files against the adapted model), --verify refused for PEFT output. Finally the PEFT
dirs themselves (``--adapters PEFT_DIR --merge_lora true``) merge into the same model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_train_parity import write_data

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_export_lora_worker.py"
TOL = 1e-5


def _run(spec: dict, path: Path, nproc: int) -> dict:
    from helpers import launch_worker

    path.write_text(json.dumps(spec))
    launch_worker(WORKER, nproc, [path], timeout=1200, expect=None, tail=16000,
                  plain_single=True)
    return json.loads(Path(spec["out"]).read_text())


@pytest.mark.timeout(1800)
def test_export_lora_dora_tp2_runs(tiny_ckpt, tmp_path):
    base = tmp_path / "base_hf"
    shutil.copytree(tiny_ckpt("qwen2_vl"), base)
    data, _ = write_data(tmp_path / "data")
    runs = {k: tmp_path / f"run_{k}" for k in ("lora", "dora")}
    out = {k: tmp_path / k for k in ("peft_lora_tp2", "merged_lora_tp1", "merged_dora_tp2",
                                     "peft_dora_tp1", "merged_lora_pp2", "merged_from_peft_lora",
                                     "merged_from_peft_dora")}

    def argv(kind: str) -> list[str]:
        extra = ["--modules_to_save", "lm_head"] if kind == "dora" else []
        return ["--model", str(base), "--dataset", str(data), "--train_type", kind,
                "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0", *extra,
                "--torch_dtype", "float32", "--train_iters", "2", "--micro_batch_size", "1",
                "--global_batch_size", "2", "--lr", "2e-2", "--max_length", "256",
                "--seed", "0", "--tp", "2", "--output_dir", str(runs[kind]),
                "--save_safetensors", "false", "--report_to", "none", "--disable_tqdm", "true"]

    ref = {k: str(tmp_path / f"ref_{k}.pt") for k in runs}
    train = _run({
        "phase": "train", "tp": 2, "out": str(tmp_path / "train.json"),
        "runs": [{"name": k, "argv": argv(k), "ref": ref[k]} for k in runs],
        "exports": {
            "peft_lora_tp2": ["export", "--adapters", str(runs["lora"] / "checkpoint-2"),
                              "--merge_lora", "false", "--tp", "2", "--device", "cpu",
                              "--output", str(out["peft_lora_tp2"])],
            "merged_dora_tp2": ["export", "--model", str(runs["dora"]), "--merge_lora", "true",
                                "--tp", "2", "--device", "cpu",
                                "--output", str(out["merged_dora_tp2"])],
            "merged_lora_pp2": ["export", "--model", str(runs["lora"]), "--merge_lora", "true",
                                "--pp", "2", "--device", "cpu",
                                "--output", str(out["merged_lora_pp2"])],
        }}, tmp_path / "spec_train.json", 2)
    for name, (rc, err) in train.items():
        assert rc == 0, (name, err)
    ckpt = runs["lora"] / "checkpoint-2" / "model"
    assert not list(ckpt.glob("*.safetensors"))
    adapter_cfg = json.loads((out["peft_lora_tp2"] / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8 and \
        not adapter_cfg["use_dora"]

    moved = tmp_path / "base_moved"
    base.rename(moved)  # the recorded base is gone: exports must be told --model
    full = tmp_path / "full_mcore"
    lora_ck = str(runs["lora"] / "checkpoint-2")
    exports = {
        "no_base": ["export", "--model", str(runs["lora"]), "--merge_lora", "true",
                    "--output", str(tmp_path / "never")],
        "merged_lora_tp1": ["export", "--adapters", lora_ck, "--model", str(moved),
                            "--merge_lora", "true", "--device", "cpu",
                            "--output", str(out["merged_lora_tp1"])],
        "exists": ["export", "--adapters", lora_ck, "--model", str(moved), "--merge_lora",
                   "true", "--device", "cpu", "--output", str(out["merged_lora_tp1"])],
        # Megatron-SWIFT's spelling
        "peft_dora_tp1": ["export", "--mcore_adapters", str(runs["dora"]), "--model", str(moved),
                          "--to_hf", "true", "--merge_lora", "false", "--device", "cpu",
                          "--save", str(out["peft_dora_tp1"])],
        "no_merge_flag": ["export", "--adapters", lora_ck, "--model", str(moved),
                          "--output", str(tmp_path / "never")],
        "convert_full": ["convert", "--to", "mcore", "--model", str(moved), "--output",
                         str(full), "--device", "cpu"],
        "full_with_merge": ["export", "--model", str(full), "--merge_lora", "true",
                            "--output", str(tmp_path / "never")],
        "overwrite": ["export", "--adapters", lora_ck, "--model", str(moved), "--merge_lora",
                      "true", "--device", "cpu", "--overwrite", "--verify",
                      "--output", str(out["merged_lora_tp1"])],
        "peft_verify": ["export", "--adapters", lora_ck, "--model", str(moved), "--merge_lora",
                        "false", "--verify", "--output", str(tmp_path / "never")],
        # a PEFT dir (what `mvlm sft --merge_lora false` writes) merged into its base
        "merged_from_peft_lora": ["export", "--adapters", str(out["peft_lora_tp2"]), "--model",
                                  str(moved), "--merge_lora", "true", "--device", "cpu",
                                  "--verify", "--output", str(out["merged_from_peft_lora"])],
        "merged_from_peft_dora": ["export", "--adapters", str(out["peft_dora_tp1"]), "--model",
                                  str(moved), "--merge_lora", "true", "--device", "cpu",
                                  "--output", str(out["merged_from_peft_dora"])],
    }
    compare = {
        "peft_lora_tp2": {"kind": "peft", "dir": str(out["peft_lora_tp2"]), "ref": ref["lora"],
                          "base_delta": True},
        "merged_lora_tp1": {"kind": "merged", "dir": str(out["merged_lora_tp1"]),
                            "ref": ref["lora"]},
        "merged_dora_tp2": {"kind": "merged", "dir": str(out["merged_dora_tp2"]),
                            "ref": ref["dora"], "base_delta": True},
        "peft_dora_tp1": {"kind": "peft", "dir": str(out["peft_dora_tp1"]), "ref": ref["dora"]},
        "merged_lora_pp2": {"kind": "merged", "dir": str(out["merged_lora_pp2"]),
                            "ref": ref["lora"]},
        "merged_from_peft_lora": {"kind": "merged", "dir": str(out["merged_from_peft_lora"]),
                                  "ref": ref["lora"]},
        "merged_from_peft_dora": {"kind": "merged", "dir": str(out["merged_from_peft_dora"]),
                                  "ref": ref["dora"]},
    }
    res = _run({"phase": "check", "base": str(moved), "out": str(tmp_path / "check.json"),
                "exports": exports, "compare": compare}, tmp_path / "spec_check.json", 1)
    cli = res["cli"]
    for name in ("merged_lora_tp1", "peft_dora_tp1", "convert_full", "overwrite",
                 "merged_from_peft_lora", "merged_from_peft_dora"):
        assert cli[name][0] == 0, (name, cli[name])
    for name, needle in (("no_base", "--model BASE_HF_DIR"), ("exists", "--overwrite"),
                         ("no_merge_flag", "--merge_lora true"),
                         ("full_with_merge", "not a LoRA/DoRA"),
                         ("peft_verify", "--verify")):
        rc, err = cli[name]
        assert rc != 0 and needle in err, (name, rc, err)
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    peft_cfg = json.loads((out["peft_dora_tp1"] / "adapter_config.json").read_text())
    assert peft_cfg["use_dora"] and peft_cfg["modules_to_save"] == ["lm_head"]
    for name in compare:
        r = res[name]
        print(f"{name}: max|dlogits| vs trained model = {r['max_abs']:.3e}"
              + (f" (base vs trained {r['base_vs_trained']:.3e})" if "base_vs_trained" in r
                 else ""))
        assert r["max_abs"] <= TOL, (name, r)
        if "base_vs_trained" in r:  # the adapters really changed the model
            assert r["base_vs_trained"] > 1e-3, (name, r)
