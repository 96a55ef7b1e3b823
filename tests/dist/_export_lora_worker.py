"""Worker for tests/dist/test_export_lora.py: phases of `mvlm export --merge_lora` in one process.

Phase "train" (torchrun, 2 ranks): LoRA and DoRA `mvlm sft` runs at TP2 (2 steps each); the
trained model's logits, restored by the trainer's own resume code at TP2 (base weights from the
HF dir + adapters-only checkpoint), on text / image / two-image inputs (saved with the inputs);
then `mvlm export` at TP2 on both ranks (LoRA -> PEFT dir, DoRA -> merged HF).
Phase "check" (one plain process): `mvlm export` at TP1 (LoRA -> merged HF, DoRA -> PEFT dir),
the error cases, and the logits of transformers on the merged dirs and of peft.PeftModel on the
base HF model for the PEFT dirs, each compared with the trained model's.
Spec (JSON, argv[1]) is written by the test; results go to spec["out"] (JSON) on rank 0.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def cli(argv: list[str]) -> tuple[int, str]:
    """`mvlm ARGV` in this process (the real parser and error handling); (rc, stderr)."""
    from mvlm.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def reference_logits(run: dict, tp: int) -> tuple[list, list[torch.Tensor]]:
    """The trained model as the trainer itself restores it on resume, and its logits."""
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.convert.verify import make_inputs, mcore_forward
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.train import checkpoint as ckpt
    from mvlm.train.args import parse_train_args
    from mvlm.tuners.train_hooks import setup_adapters

    cfg = parse_train_args(run["argv"], "sft")
    layout = ParallelLayout(tp=tp)
    startup(layout, device="cpu")
    hf = Path(cfg.base.model)
    bundle = build_model(AutoConfig.from_pretrained(hf), layout, dtype=torch.float32,
                         device="cpu", perform_initialization=False)
    load_hf_weights(bundle, hf)
    setup_adapters(bundle, cfg)
    ckpt.load_checkpoint(ckpt.read_latest(Path(cfg.output_dir)), bundle, None, None, layout)
    inputs = make_inputs(bundle, hf, 1)
    return inputs, [mcore_forward(bundle, b) for _, b in inputs]


def phase_train(spec: dict) -> dict:
    from megatron.core import parallel_state

    from mvlm.train.trainer import run_training

    res: dict = {}
    for run in spec["runs"]:
        rc = run_training(run["argv"], "sft")
        assert rc == 0, (run["name"], rc)
        inputs, logits = reference_logits(run, spec["tp"])
        if dist.get_rank() == 0:
            torch.save({"inputs": inputs, "logits": logits}, run["ref"])
        parallel_state.destroy_model_parallel()
        dist.barrier()
    for name, argv in spec["exports"].items():
        res[name] = cli(argv)
        dist.barrier()
    return res


def _maxdiff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def _hf_logits(model, inputs) -> list[torch.Tensor]:
    from mvlm.convert.verify import _hf_forward

    model.eval()
    with torch.no_grad():
        return [_hf_forward(model, b)[0] for _, b in inputs]


def phase_check(spec: dict) -> dict:
    import transformers
    from peft import PeftModel

    res: dict = {"cli": {}}
    for name, argv in spec["exports"].items():
        res["cli"][name] = cli(argv)
    base_dir = spec["base"]
    cls = transformers.AutoModelForImageTextToText
    for name, c in spec["compare"].items():
        ref = torch.load(c["ref"], weights_only=False)
        base = cls.from_pretrained(base_dir, dtype=torch.float32)
        if c["kind"] == "merged":
            model = cls.from_pretrained(c["dir"], dtype=torch.float32)
        else:
            model = PeftModel.from_pretrained(base, c["dir"])
        got = _hf_logits(model, ref["inputs"])
        res[name] = {"max_abs": _maxdiff(ref["logits"], got)}
        if c.get("base_delta"):
            base = cls.from_pretrained(base_dir, dtype=torch.float32)
            res[name]["base_vs_trained"] = _maxdiff(ref["logits"],
                                                    _hf_logits(base, ref["inputs"]))
    return res


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec["phase"] == "train":
        dist.init_process_group("gloo")
        res = phase_train(spec)
        if dist.get_rank() == 0:
            Path(spec["out"]).write_text(json.dumps(res))
        dist.barrier()
        dist.destroy_process_group()
    else:
        Path(spec["out"]).write_text(json.dumps(phase_check(spec)))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
