"""`mvlm pt|sft` flags: ms-swift / HF-Trainer / Megatron names, YAML, up-front validation,
and the pt vs sft label masks the data pipeline produces for each command."""
from __future__ import annotations

import json

import pytest

from mvlm.train.args import parse_train_args


@pytest.fixture
def dirs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    return model, data, tmp_path / "out"


def base(dirs):
    model, data, out = dirs
    return ["--model", str(model), "--dataset", str(data), "--output_dir", str(out)]


def test_hf_trainer_flags_are_mapped(dirs):
    cfg = parse_train_args(base(dirs) + [
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4",
        "--learning_rate", "3e-5", "--warmup_ratio", "0.1", "--lr_scheduler_type",
        "cosine_with_min_lr", "--eval_strategy", "steps", "--eval_steps", "50",
        "--save_steps", "100", "--logging_steps", "5", "--model_type", "qwen2_5_vl",
        "--deepspeed", "zero3", "--max_grad_norm", "0.5", "--gradient_checkpointing", "true",
        "--num_train_epochs", "2"], "sft")
    assert cfg.schedule.micro_batch_size == 2 and cfg.optim.lr == 3e-5
    assert cfg.optim.lr_warmup_fraction == 0.1
    assert cfg.optim.lr_decay_style == "cosine" and cfg.eval.eval_interval == 50
    assert cfg.ckpt.save_interval == 100 and cfg.log.log_interval == 5
    assert cfg.optim.clip_grad == 0.5
    assert cfg.parallel.use_distributed_optimizer
    assert cfg.parallel.recompute_granularity == "full"
    cfg.resolve_batch(world_size=4)  # DP 4
    assert cfg.schedule.global_batch_size == 2 * 4 * 4
    notes = "\n".join(cfg.notes)
    for flag in ("--per_device_train_batch_size", "--gradient_accumulation_steps",
                 "--learning_rate", "--deepspeed zero3", "--model_type", "--eval_strategy"):
        assert flag in notes, (flag, notes)
    # one line per mapping
    assert sum("--learning_rate" in n for n in cfg.notes) == 1


def test_megatron_flags(dirs):
    model, data, out = dirs
    cfg = parse_train_args(["--load_safetensors", "true", "--model", str(model), "--dataset",
                            str(data), "--save", str(out), "--tensor_parallel_size", "2",
                            "--pipeline_model_parallel_size", "2", "--context_parallel_size",
                            "1", "--expert_model_parallel_size", "1", "--micro_batch_size", "1",
                            "--global_batch_size", "8", "--lr", "1e-5", "--min_lr", "1e-6",
                            "--lr_warmup_fraction", "0.05", "--max_epochs", "1",
                            "--sequence_parallel", "true", "--cross_entropy_loss_fusion", "true",
                            "--attention_backend", "flash", "--no_save_optim", "true",
                            "--finetune", "true", "--packing", "true", "--max_length", "64"],
                           "sft")
    p = cfg.parallel
    assert (p.tp, p.pp, cfg.output_dir, p.sequence_parallel) == (2, 2, str(out), True)
    assert cfg.base.attn_impl == "flash" and not cfg.ckpt.save_optim and cfg.data.packing
    cfg.resolve_batch(world_size=8)  # DP 2
    assert cfg.schedule.global_batch_size == 8


def test_deepspeed_zero0_keeps_plain_optimizer(dirs):
    cfg = parse_train_args(base(dirs) + ["--deepspeed", "zero0"], "sft")
    assert not cfg.parallel.use_distributed_optimizer


@pytest.mark.parametrize("extra,flag,fix", [
    (["--fsdp", "full_shard"], "--fsdp", "--use_distributed_optimizer"),
    # mvlm.tuners: LoRA is available now; a PEFT adapter still needs an adapter train type
    (["--adapters", "some_dir"], "--adapters", "--train_type lora"),
    (["--lr_decay_style", "wsd"], "--lr_decay_style", "cosine"),
    (["--torch_dtype", "float16"], "--torch_dtype", "bfloat16"),
    (["--packing", "true"], "--packing", "--max_length"),
    (["--freeze_vit", "true", "--vit_lr", "1e-4"], "--vit_lr", "--freeze_vit"),
    (["--deepspeed", "zero9"], "--deepspeed", "zero2"),
])
def test_invalid_configs_name_flag_and_fix(dirs, extra, flag, fix):
    with pytest.raises(ValueError) as e:
        parse_train_args(base(dirs) + extra, "sft")
    assert flag in str(e.value) and fix in str(e.value), str(e.value)


@pytest.mark.parametrize("extra", [
    ["--micro_batch_size", "2", "--packing", "true"],
    ["--per_device_train_batch_size", "2", "--packing", "true", "--padding_free", "true"],
    ["--per_device_train_batch_size", "2", "--padding_free", "true"],
])
def test_packing_keeps_micro_batch_of_n_rows(dirs, extra):
    """With packing a micro-batch of N holds N packed rows (ms-swift's meaning): N is kept, not
    refused or forced to 1, and the global batch counts packed rows."""
    cfg = parse_train_args(base(dirs) + extra + ["--max_length", "64", "--global_batch_size",
                                                  "8"], "sft")
    assert cfg.data.packing and cfg.schedule.micro_batch_size == 2
    cfg.resolve_batch(world_size=2)  # DP 2 -> 2 micro-batches of 2 packed rows per rank
    assert cfg.schedule.global_batch_size == 8 and cfg.schedule.micro_batch_size == 2


def test_missing_model_and_batch_divisibility(dirs):
    model, data, out = dirs
    with pytest.raises(ValueError, match="--model"):
        parse_train_args(["--dataset", str(data), "--output_dir", str(out)], "sft")
    cfg = parse_train_args(base(dirs) + ["--micro_batch_size", "2", "--global_batch_size", "6"],
                           "sft")
    with pytest.raises(ValueError, match="--global_batch_size 6 is not a multiple"):
        cfg.resolve_batch(world_size=2)


def test_yaml_config_with_cli_override(dirs, tmp_path):
    model, data, out = dirs
    y = tmp_path / "run.yaml"
    y.write_text(f"model: {model}\ndataset: [{data}]\noutput_dir: {out}\nlearning_rate: 1e-4\n"
                 "freeze_vit: true\ntp: 2\n")
    cfg = parse_train_args(["--config", str(y), "--tp", "1"], "pt")
    assert cfg.optim.lr == 1e-4 and cfg.freeze.freeze_vit and cfg.parallel.tp == 1
    assert cfg.task == "pt" and cfg.data.task == "pt"


def test_pt_and_sft_label_masks(tiny_ckpt, tmp_path):
    """sft: loss only on the assistant answer (+ its end token); pt: on every text token,
    never on image placeholders."""
    from mvlm.data.encode import build_train_dataset
    from mvlm.demo_data import write_demo_dataset

    vl = tiny_ckpt("qwen2_5_vl")
    demo = write_demo_dataset(tmp_path / "demo", n_train=2, n_val=0, image_size=56)
    out = tmp_path / "o"
    got = {}
    for task in ("pt", "sft"):
        cfg = parse_train_args(["--model", str(vl), "--dataset", str(demo.train),
                                "--output_dir", str(out), "--max_length", "256",
                                "--dataset_shuffle", "false"], task)
        data = build_train_dataset(cfg.data, str(vl))
        got[task] = data.train[0]
    cfg_json = json.loads((vl / "config.json").read_text())
    img = cfg_json["image_token_id"]
    for task, s in got.items():
        ids, labels = list(s["input_ids"]), list(s["labels"])
        assert not any(lab != -100 for i, lab in zip(ids, labels, strict=True) if i == img), task
    n_sft = sum(lab != -100 for lab in got["sft"]["labels"])
    n_pt = sum(lab != -100 for lab in got["pt"]["labels"])
    answer = json.loads(demo.train.read_text().splitlines()[0])["messages"][-1]["content"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vl)
    trained = tok.decode([t for t in got["sft"]["labels"] if t != -100])
    assert answer in trained and "user" not in trained, trained
    assert n_pt > n_sft + 3, (n_pt, n_sft)
    pt_text = tok.decode([t for t in got["pt"]["labels"] if t != -100])
    assert "What" in pt_text and answer in pt_text, pt_text


def test_demo_passes_the_freeze_flags_it_needs(tmp_path):
    """ms-swift's defaults freeze the ViT and aligner; the demo must keep training them (its
    task needs the vision tower to learn shapes/colours), so its command line says so
    explicitly and its accuracy does not depend on mvlm's defaults."""
    import argparse

    from mvlm.demo import DemoConfig, add_demo_args, sft_args

    p = argparse.ArgumentParser()
    add_demo_args(p)
    args = DemoConfig.from_flags(vars(p.parse_args([])))
    assert args == DemoConfig()  # the flags' defaults are the config's
    model = tmp_path / "hf"
    model.mkdir()
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    for tt in ("full", "lora", "lora_llm"):
        args.train_type = tt
        argv = sft_args(model, data, tmp_path / "out", 1, args)
        assert argv[0] == "sft"
        cfg = parse_train_args(argv[1:], "sft")
        f = cfg.freeze
        assert not f.freeze_vit and not f.freeze_aligner and not f.freeze_llm, tt
        assert cfg.optim.lr == args.lr, tt


def test_demo_model_type_offers_the_vision_families_and_refuses_others(capsys):
    """`mvlm demo --model_type F` takes every registered family with a vision tower (their
    accuracies: bench/demo_families.py); a text-only or unknown family is refused by the
    parser, naming the choices, before anything is built."""
    import argparse

    import pytest

    from mvlm.demo import DEFAULT_DEMO_FAMILY, DemoConfig, add_demo_args, demo_families
    from mvlm.models.registry import families

    fams = demo_families()
    assert DEFAULT_DEMO_FAMILY in fams and {"qwen2_vl", "llava", "internvl"} <= set(fams)
    assert set(fams) == {f.name for f in families() if f.vision is not None}
    p = argparse.ArgumentParser()
    add_demo_args(p)
    assert DemoConfig.from_flags(vars(p.parse_args(["--model_type", "llava"]))).model_type \
        == "llava"
    for bad in ("qwen2", "no_such_family"):
        with pytest.raises(SystemExit):
            p.parse_args(["--model_type", bad])
        assert "invalid choice" in capsys.readouterr().err
