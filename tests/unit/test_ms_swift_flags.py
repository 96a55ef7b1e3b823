"""ms-swift command lines through `mvlm sft|pt` (tests/fixtures/ms_swift/README.md).

* every command of the users' guide and of ms-swift's multimodal example scripts parses (two
  example scripts use flags mvlm refuses: the refusal names each flag, and the rest parses);
  nothing is dropped silently: every ignored flag prints its info line, and the adapter type
  follows --tuner_type (deleting it would have turned LoRA scripts into full training);
* every flag of the documented ms-swift / Megatron-SWIFT core set is known to the parser;
* docs/ms-swift.md is what the parser's tables generate;
* the flags mvlm implements behave as ms-swift's (unit checks, numbers exact);
* the guide's 8.1 script trains for 2 steps on CPU (hub model and dataset IDs served from an
  offline HF cache).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mvlm.train.args import IGNORED, REFUSED, SAME_MEANING, parse_train_args

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "ms_swift"
SCRIPTS = sorted(FIX.glob("*.sh"))
REV = "fedcba9876543210fedcba9876543210fedcba98"

# Scripts with flags mvlm refuses (each must be named by the refusal) -> those flags.
EXPECTED_REFUSALS = {
    # (issue 9) Megatron-SWIFT's lora_llm_vit_full/sft.sh (--add_non_thinking_prefix true,
    # --loss_scale ignore_empty_think) parses: tests/unit/test_think_prefix.py
    # (issue 9) the guide's 6.3 block (--packing with --lazy_tokenize: encoded up front) and 3.3
    # block (--streaming with epochs: the local file's rows are counted) parse: see
    # test_guide_3_3_and_6_3_data_flags
    "swift_train_multimodal_lora_llm_full_vit_seq_cls.sh": {"--num_labels", "--task_type"},
}

_RECORDER = r"""
_mvlm_rec() { "$MVLM_PY" -c '
import json, os, sys
keys = os.environ.get("MVLM_KEYS", "").split()
env = {k: v for k, v in os.environ.items() if k in keys}
rec = {"cmd": sys.argv[1], "argv": sys.argv[2:], "env": env}
print("MVLM_CMD " + json.dumps(rec))' "$@"; }
swift() { _mvlm_rec "swift $1" "${@:2}"; }
megatron() { _mvlm_rec "megatron $1" "${@:2}"; }
pip() { :; }
"""
ENV_KEYS = ("NPROC_PER_NODE MAX_PIXELS MIN_PIXELS VIDEO_MAX_PIXELS FPS_MAX_FRAMES "
            "IMAGE_MAX_TOKEN_NUM VIDEO_MAX_TOKEN_NUM AUDIO_MAX_TOKEN_NUM SAMPLING_RATE "
            "CUDA_VISIBLE_DEVICES")


def record_commands(script: Path, cwd: Path) -> list[dict]:
    """Run the script with bash (its own variables, $(...) and env prefixes), with swift /
    megatron / pip as recorders: the commands exactly as the shell would start them."""
    env = dict(os.environ, MVLM_PY=sys.executable, MVLM_KEYS=ENV_KEYS)
    p = subprocess.run(["bash", "-c", _RECORDER + f"\nsource {shlex.quote(str(script))}\n"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return [json.loads(line[len("MVLM_CMD "):]) for line in p.stdout.splitlines()
            if line.startswith("MVLM_CMD ")]


def _values(argv: list[str], flag: str) -> list[str] | None:
    out = None
    for i, t in enumerate(argv):
        if t == flag:
            out = []
            for v in argv[i + 1:]:
                if v.startswith("--"):
                    break
                out.append(v)
    return out


def _drop(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for t in argv:
        if t.startswith("--"):
            skip = t == flag
        if not skip:
            out.append(t)
    return out


def hf_cache_with(cache: Path, models: dict[str, Path], datasets: dict[str, dict[str, str]]
                  ) -> None:
    """An HF hub cache (huggingface_hub's layout) holding ``models`` (id -> local dir, linked
    as the snapshot) and ``datasets`` (id -> {relative file: text})."""
    for repo_id, src in models.items():
        root = cache / ("models--" + repo_id.replace("/", "--"))
        (root / "snapshots").mkdir(parents=True, exist_ok=True)
        if not (root / "snapshots" / REV).exists():
            (root / "snapshots" / REV).symlink_to(src, target_is_directory=True)
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(REV)
    for repo_id, files in datasets.items():
        root = cache / ("datasets--" + repo_id.replace("/", "--"))
        for rel, text in files.items():
            f = root / "snapshots" / REV / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(REV)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Every fixture command, a cwd where its relative paths exist, and an offline HF cache
    that serves every --model ID (an empty checkpoint dir: parsing reads no weights)."""
    tmp = tmp_path_factory.mktemp("ms_swift")
    work = tmp / "work"
    (work / "output" / "stage1_aligner").mkdir(parents=True)  # guide 7.1 stage 2's --model
    # guide 3.3 streams it for 3 epochs: its rows are counted (a blank line is no row, a bad
    # line is one)
    (work / "medical_image_corpus.jsonl").write_text(
        "".join(json.dumps({"messages": [{"role": "assistant", "content": f"t{i}"}]}) + "\n"
                for i in range(6)) + "\n{broken\n")
    model_dir = tmp / "model"
    model_dir.mkdir()
    cmds = {s.name: record_commands(s, work) for s in SCRIPTS}
    ids = {c["argv"][c["argv"].index("--model") + 1] for cs in cmds.values() for c in cs}
    ids = {i for i in ids if not (work / i).exists()}
    hf_cache_with(tmp / "hub", {i: model_dir for i in ids}, {})
    return {"cmds": cmds, "work": work, "cache": tmp / "hub", "ids": ids}


@pytest.fixture
def offline(recorded, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(recorded["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(recorded["work"])
    return recorded


def _task(cmd: str) -> str:
    return "pt" if cmd.endswith(" pt") else "sft"


def test_fixture_set_is_complete(recorded):
    names = {s.name for s in SCRIPTS}
    guide = {n for n in names if n.startswith("guide_")}
    examples = {n for n in names if n.startswith("swift_")}
    assert len(guide) == 8 and len(examples) == 15, (guide, examples)
    cmds = [c for cs in recorded["cmds"].values() for c in cs]
    assert {c["cmd"] for c in cmds} == {"swift sft", "swift pt", "megatron sft"}
    assert len(cmds) == 8 + 2 + 15  # guide_9_3 holds three commands
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in recorded["ids"]


@pytest.mark.parametrize("script", [s.name for s in SCRIPTS])
def test_every_command_parses(offline, script, monkeypatch):
    for c in offline["cmds"][script]:
        for k, v in c["env"].items():
            if k != "NPROC_PER_NODE":
                monkeypatch.setenv(k, v)
        argv, refused = list(c["argv"]), set()
        expected = EXPECTED_REFUSALS.get(script, set())
        while True:
            try:
                cfg = parse_train_args(argv, _task(c["cmd"]))
                break
            except ValueError as e:
                hit = [f for f in expected - refused if str(e).startswith(f)]
                assert hit, f"{script}: unexpected refusal: {e}"
                refused.add(hit[0])
                argv = _drop(argv, hit[0])
        assert refused == expected, (script, refused)
        notes = "\n".join(cfg.notes)
        used = [t for t in c["argv"] if t.startswith("--")]
        for flag in used:
            if flag in IGNORED:
                assert f"{flag} ignored:" in notes, (script, flag)
            if SAME_MEANING.get(flag, flag) != flag:
                assert f"{flag} -> {SAME_MEANING[flag]}" in notes, (script, flag)
        # the adapter type follows --tuner_type/--train_type (ms-swift's default: full here)
        tt = (_values(argv, "--tuner_type") or _values(argv, "--train_type") or ["full"])[0]
        if _values(argv, "--use_dora") == ["true"] and tt == "lora":
            tt = "dora"
        assert cfg.tuner.train_type == tt, (script, cfg.tuner.train_type, tt)
        # ms-swift's freeze defaults, and what the scripts ask for
        for part in ("vit", "aligner"):
            given = _values(argv, f"--freeze_{part}")
            want = given[0] == "true" if given else tt != "lora_llm"
            assert getattr(cfg.freeze, f"freeze_{part}") is want, (script, part)
        lr = _values(argv, "--learning_rate") or _values(argv, "--lr")
        want_lr = float(lr[0]) if lr else (1e-5 if tt == "full" else 1e-4)
        assert cfg.optim.lr == want_lr, script
        assert cfg.base.model and os.path.isdir(cfg.base.model)


def test_megatron_lora_script_semantics(offline):
    """Megatron-SWIFT LoRA example: adapters (not full), TP1 SP dropped with a note, packing,
    recompute, frozen ViT/aligner, no optimizer in checkpoints."""
    c = offline["cmds"]["swift_megatron_multimodal_dense_lora.sh"][0]
    cfg = parse_train_args(c["argv"], "sft")
    t = cfg.tuner
    assert t.train_type == "lora" and t.lora_rank == 8 and t.lora_alpha == 32
    assert cfg.data.packing and cfg.parallel.recompute_granularity == "full"
    assert not cfg.ckpt.save_optim
    assert cfg.freeze.freeze_vit and cfg.freeze.freeze_aligner and not cfg.freeze.freeze_llm
    o = cfg.optim
    assert (o.lr, o.min_lr, o.lr_warmup_fraction) == (1e-4, 1e-5, 0.05)
    assert any("--tuner_type -> --train_type (ms-swift 4's name" in n for n in cfg.notes)
    assert not cfg.parallel.sequence_parallel  # TP=1


def test_guide_scripts_build_the_nested_config(offline):
    """The guide's 4.3 (swift sft, HF-Trainer names) and 8.3 (megatron sft, Megatron names)
    scripts each become one typed TrainConfig: every value lands in its section."""
    from mvlm.config import TrainConfig

    c = offline["cmds"]["guide_4_3_sft_lora.sh"][0]
    cfg = parse_train_args(c["argv"], _task(c["cmd"]))
    assert isinstance(cfg, TrainConfig) and cfg.task == "sft"
    assert cfg.output_dir == "output/sft_qwen2_5_vl" and os.path.isdir(cfg.base.model)
    assert (cfg.base.torch_dtype, cfg.base.attn_impl) == ("bfloat16", "flash")
    assert (cfg.tuner.train_type, cfg.tuner.lora_rank, cfg.tuner.lora_alpha) == ("lora", 64, 128)
    s = cfg.schedule
    assert (s.micro_batch_size, s.gradient_accumulation_steps, s.num_train_epochs,
            s.train_iters, s.global_batch_size) == (2, 4, 3.0, None, None)
    cfg.resolve_batch(world_size=4)  # NPROC_PER_NODE=4, TP=PP=CP=1: DP 4
    assert s.global_batch_size == 2 * 4 * 4
    assert (cfg.optim.lr, cfg.optim.lr_warmup_fraction) == (5e-5, 0.05)
    assert (cfg.data.dataset, cfg.data.max_length, cfg.data.packing, cfg.data.task) == (
        ["custom_vqa_dataset.jsonl"], 8192, True, "sft")
    assert (cfg.freeze.freeze_vit, cfg.freeze.freeze_aligner, cfg.freeze.freeze_llm) == (
        True, True, False)
    assert cfg.parallel.layout_kwargs == {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "etp": None,
                                          "vpp": None}

    c = offline["cmds"]["guide_8_3_megatron.sh"][0]
    cfg = parse_train_args(c["argv"], _task(c["cmd"]))
    p = cfg.parallel
    assert (p.tp, p.pp, p.cp, p.use_distributed_optimizer) == (4, 2, 1, True)  # zero2
    assert p.dp_size(8) == 1
    assert (cfg.schedule.micro_batch_size, cfg.schedule.global_batch_size) == (1, 32)
    assert cfg.schedule.num_train_epochs == 3.0 and cfg.optim.lr == 5e-5
    assert (cfg.base.torch_dtype, cfg.base.attn_impl) == ("bfloat16", "flash")
    assert cfg.output_dir == "output/megatron_vlm" and cfg.ckpt.save_safetensors
    assert cfg.tuner.train_type == "lora" and cfg.data.dataset == ["multimodal_dataset.jsonl"]
    assert sum(n.startswith("--tensor_parallel_size -> --tp") for n in cfg.notes) == 1


# Flags of ms-swift's / Megatron-SWIFT's documented core set (the flagged "important" ones of
# their command-line docs, plus what the guide and the example scripts use): all must be known.
CORE_FLAGS = """
adapters agent_template aligner_lr cached_dataset create_checkpoint_symlink
dataloader_num_workers dataset dataset_num_proc ddp_find_unused_parameters deepspeed eval_steps
eval_strategy experts_impl external_plugins freeze_aligner freeze_llm freeze_vit fsdp
gradient_accumulation_steps gradient_checkpointing learning_rate load_from_cache_file lora_alpha
lora_rank lorap_lr_ratio loss_scale max_length max_pixels merge_lora model model_author
model_name modules_to_save neftune_noise_alpha num_train_epochs output_dir packing padding_free
per_device_eval_batch_size per_device_train_batch_size remove_unused_columns report_to
resume_from_checkpoint save_steps save_strategy save_total_limit split_dataset_ratio system
target_modules target_regex template torch_dtype tuner_backend tuner_type use_dora
use_liger_kernel val_dataset vit_gradient_checkpointing vit_lr warmup_ratio
async_save attention_backend attention_softmax_in_fp32 clip_grad context_parallel_size
cross_entropy_loss_fusion decoder_first_pipeline_num_layers decoder_last_pipeline_num_layers
eval_iters expert_model_parallel_size expert_tensor_parallel_size finetune global_batch_size
group_by_length logging_steps lr lr_decay_iters lr_warmup_fraction mcore_model micro_batch_size
min_lr moe_aux_loss_coeff moe_expert_capacity_factor moe_grouped_gemm moe_permute_fusion
moe_router_dtype moe_shared_expert_overlap no_load_optim no_load_rng no_save_optim no_save_rng
offload_bridge optimizer_cpu_offload optimizer_offload_fraction overlap_grad_reduce
overlap_param_gather pipeline_model_parallel_layout pipeline_model_parallel_size
recompute_granularity recompute_method recompute_modules recompute_num_layers save_safetensors
sequence_parallel task_type tensor_model_parallel_size train_iters use_distributed_optimizer
weight_decay add_non_thinking_prefix adam_epsilon lr_scheduler_kwargs data_seed columns strict
packing_length lora_bias lora_dtype freeze_parameters freeze_parameters_regex
freeze_parameters_ratio trainable_parameters trainable_parameters_regex sequence_parallel_size
logging_dir tensorboard_dir max_shard_size truncation_strategy use_hf hub_token model_revision
seed streaming lazy_tokenize dataset_shuffle lr_scheduler_type lr_decay_style warmup_steps
max_steps max_grad_norm adam_beta1 adam_beta2 adam_eps num_labels load_safetensors
attn_impl model_type min_pixels use_rslora lora_dropout optim optimizer
""".split()


def test_core_flags_are_all_known():
    from mvlm.train.args import build_parser

    known = set(build_parser("sft")._option_string_actions)
    missing = [f for f in CORE_FLAGS if "--" + f not in known]
    assert not missing, missing


def test_flag_doc_is_generated_from_the_tables():
    from mvlm.train.args import FLAG_DOC, flag_table, render_flag_doc

    doc = (REPO / FLAG_DOC).read_text(encoding="utf-8")
    assert doc == render_flag_doc(), ("docs/ms-swift.md is stale: regenerate with python -c "
                                      "'from mvlm.train.args import write_flag_doc; "
                                      "write_flag_doc()'")
    kinds = {f: k for f, k, _ in flag_table()}
    assert kinds["--tuner_type"] == "alias" and kinds["--load_from_cache_file"] == "ignored"
    assert kinds["--decoder_first_pipeline_num_layers"] == "refused"
    assert kinds["--truncation_strategy split"] == "refused value"
    assert kinds["--bf16"] == "mapped"
    assert all(k in ("native", "alias", "mapped", "ignored", "refused", "refused value")
               for k in kinds.values())
    assert set(REFUSED) <= set(kinds) and set(IGNORED) <= set(kinds)


# ----------------------------------------------------------------------------- flag behaviour

@pytest.fixture
def base(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    return ["--model", str(model), "--dataset", str(data), "--output_dir", str(tmp_path / "o")]


def parse(base, *extra, task="sft"):
    return parse_train_args(list(base) + list(extra), task)


def test_defaults_follow_ms_swift(base):
    full = parse(base)
    f = full.freeze
    assert (f.freeze_vit, f.freeze_aligner, f.freeze_llm, full.optim.lr) == (
        True, True, False, 1e-5)
    assert f.freeze_vit_flag is None  # the trainer only objects to explicit flags (text LMs)
    lora = parse(base, "--tuner_type", "lora")
    assert lora.optim.lr == 1e-4 and lora.freeze.freeze_vit
    assert lora.tuner.train_type == "lora"
    lllm = parse(base, "--tuner_type", "lora_llm", "--vit_lr", "1e-5")
    assert not lllm.freeze.freeze_vit and not lllm.freeze.freeze_aligner
    assert lllm.optim.vit_lr == 1e-5
    with pytest.raises(ValueError, match="--vit_lr.*ms-swift's default.*--freeze_vit false"):
        parse(base, "--vit_lr", "1e-5")
    assert any("--lr not given -> 1e-05" in n for n in full.notes)


def test_conflicting_spellings_are_refused(base):
    with pytest.raises(ValueError, match="--train_type full contradicts --tuner_type lora"):
        parse(base, "--tuner_type", "lora", "--train_type", "full")
    cfg = parse(base, "--tuner_type", "lora", "--train_type", "lora")  # guide 8.3 says both
    assert cfg.tuner.train_type == "lora"
    with pytest.raises(ValueError, match="contradicts"):
        parse(base, "--cp", "2", "--sequence_parallel_size", "4")
    with pytest.raises(ValueError, match="--lora_target_modules q_proj contradicts"):
        parse(base, "--target_modules", "all-linear", "--lora_target_modules", "q_proj")
    assert parse(base, "--lr", "1e-4", "--lr", "2e-4").optim.lr == 2e-4  # one spelling: last wins


def test_aliases_and_mapped_values(base):
    cfg = parse(base, "--adam_epsilon", "1e-6", "--sequence_parallel_size", "2",
                "--tensorboard_dir", "/tmp/tb", "--lr_scheduler_kwargs", '{"min_lr": 2e-7}',
                "--optim", "adamw_torch_fused")
    assert cfg.optim.adam_eps == 1e-6 and cfg.parallel.cp == 2
    assert cfg.log.logging_dir == "/tmp/tb"
    assert cfg.optim.min_lr == 2e-7
    notes = "\n".join(cfg.notes)
    assert "--sequence_parallel_size -> --cp (ms-swift's sequence parallelism" in notes
    for bad, flag in ((("--lr_scheduler_kwargs", '{"power": 2}'), "--lr_scheduler_kwargs"),
                      (("--optim", "sgd"), "--optim"), (("--optimizer", "muon"), "--optimizer"),
                      (("--task_type", "seq_cls"), "--task_type"),
                      (("--tuner_backend", "unsloth"), "--tuner_backend"),
                      (("--neftune_noise_alpha", "5"), "--neftune_noise_alpha"),
                      (("--finetune", "false"), "--finetune"),
                      (("--freeze_parameters_ratio", "0.5"), "--freeze_parameters_ratio"),
                      (("--columns", "[1]"), "--columns")):
        with pytest.raises(ValueError) as e:
            parse(base, *bad)
        assert str(e.value).startswith(flag), str(e.value)


def test_adapter_flags(base):
    cfg = parse(base, "--tuner_type", "lora", "--use_dora", "true")
    assert cfg.tuner.train_type == "dora"
    from mvlm.tuners.train_hooks import adapter_config

    def kind(c):
        return adapter_config(c.tuner, freeze_vit=c.freeze.freeze_vit, seed=c.seed).kind

    assert kind(cfg) == "dora"
    llm = parse(base, "--tuner_type", "lora_llm", "--use_dora", "true")
    assert llm.tuner.train_type == "lora_llm" and kind(llm) == "dora"
    for extra, msg in ((("--use_dora", "true"), "--use_dora true needs adapters"),
                       (("--tuner_type", "lora", "--lora_bias", "all"), "--lora_bias all"),
                       (("--tuner_type", "lora", "--lora_dtype", "bfloat16"),
                        "--lora_dtype bfloat16")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            parse(base, *extra)
    ok = parse(base, "--tuner_type", "lora", "--lora_dtype", "float32", "--torch_dtype",
               "float32")
    assert ok.base.torch_dtype == "float32"


def test_loss_scale_strict_and_refused_values(base):
    assert parse(base, "--loss_scale", "all").data.task == "pt"
    assert parse(base, "--loss_scale", "default").data.task == "sft"
    assert parse(base, task="pt").data.task == "pt"
    assert parse(base, "--loss_scale", "default", task="pt").data.task == "sft"
    for v in ("last_round", "all+ignore_empty_think", "last_round+hermes"):
        with pytest.raises(ValueError, match="--loss_scale: .*not implemented"):
            parse(base, "--loss_scale", v)
    for v in ("ignore_empty_think", "default+ignore_empty_think"):
        data = parse(base, "--loss_scale", v).data
        assert data.task == "sft" and data.ignore_empty_think is True
    assert parse(base, "--loss_scale", "default").data.ignore_empty_think is False
    assert parse(base, "--strict", "false").data.on_bad_sample == "skip"
    assert parse(base, "--strict", "true").data.on_bad_sample == "error"
    with pytest.raises(ValueError, match="--truncation_strategy split: splitting"):
        parse(base, "--truncation_strategy", "split")
    assert parse(base, "--add_non_thinking_prefix", "true").data.add_non_thinking_prefix is True
    # (issue 9) a local file's rows give the epochs' steps; hub IDs are refused (see
    # test_guide_3_3_and_6_3_data_flags); --packing with --lazy_tokenize encodes up front
    cfg = parse(base, "--streaming", "true", "--num_train_epochs", "3")
    assert any("steps = ceil(3 x 1 rows / global batch size)" in n for n in cfg.notes)
    assert parse(base, "--streaming", "true", "--max_steps", "5").schedule.train_iters == 5
    cfg = parse(base, "--lazy_tokenize", "true", "--padding_free", "true", "--max_length", "64")
    assert cfg.data.packing and cfg.data.lazy_tokenize is False
    assert sum(n.startswith("--lazy_tokenize true with --packing") for n in cfg.notes) == 1
    assert parse(base, "--add_non_thinking_prefix", "false").data.add_non_thinking_prefix is False


def test_deepspeed_offload_is_said_loudly(base):
    cfg = parse(base, "--deepspeed", "zero3_offload")
    assert cfg.parallel.use_distributed_optimizer
    assert any("the CPU OFFLOAD part is NOT applied" in n for n in cfg.notes), cfg.notes
    with pytest.raises(ValueError, match="--deepspeed"):
        parse(base, "--deepspeed", "zero3_foo")


def test_save_strategy(base):
    from mvlm.train.args import epoch_end_steps

    ep = parse(base, "--save_strategy", "epoch", "--save_steps", "3", "--eval_steps", "3")
    assert ep.ckpt.save_strategy == "epoch" and ep.ckpt.save_interval is None
    assert ep.eval.eval_interval is None
    # 10 items, global batch 4: epochs end inside steps 3 (items 9-12), 5 (17-20), 8, 10
    assert epoch_end_steps(10, 4, 10) == {3, 5, 8, 10}
    assert epoch_end_steps(8, 4, 5) == {2, 4}
    no = parse(base, "--save_strategy", "no", "--save_steps", "3")
    assert no.ckpt.save_interval is None and no.ckpt.save_final_checkpoint


def test_name_freeze_rule(base):
    cfg = parse(base, "--freeze_parameters", "language_model.decoder.layers.0.",
                "--freeze_parameters_regex", r"\.mlp\.", "--trainable_parameters",
                "language_model.decoder.layers.0.mlp.linear_fc2")
    rule = cfg.freeze.name_rule()
    assert rule("language_model.decoder.layers.0.self_attention.linear_qkv.weight") is True
    assert rule("language_model.decoder.layers.1.mlp.linear_fc1.weight") is True
    assert rule("language_model.decoder.layers.0.mlp.linear_fc2.weight") is False
    assert rule("language_model.decoder.layers.1.self_attention.linear_qkv.weight") is None
    every = parse(base, "--freeze_parameters_ratio", "1", "--trainable_parameters_regex",
                  "^vision_model").freeze.name_rule()
    assert every("language_model.embedding.word_embeddings.weight") is True
    assert every("vision_model.blocks.0.attn.qkv.weight") is False


def test_packing_length_and_audio_env(base, monkeypatch):
    from mvlm.data.encode import packing_length

    cfg = parse(base, "--packing", "true", "--packing_length", "64")
    assert cfg.data.max_length == 64 and packing_length(cfg.data) == 64
    cfg = parse(base, "--packing", "true", "--max_length", "32", "--packing_length", "96")
    assert cfg.data.max_length == 32 and packing_length(cfg.data) == 96
    with pytest.raises(ValueError, match="--packing_length 16 is shorter"):
        parse(base, "--packing", "true", "--max_length", "32", "--packing_length", "16")
    monkeypatch.setenv("AUDIO_MAX_TOKEN_NUM", "128")
    monkeypatch.setenv("SAMPLING_RATE", "8000")
    cfg = parse(base)
    assert sum(n.startswith(("AUDIO_MAX_TOKEN_NUM", "SAMPLING_RATE")) for n in cfg.notes) == 2
    from mvlm.data.media import MediaConfig

    m = MediaConfig.from_env()
    assert (m.sampling_rate, m.audio_max_token_num) == (8000, 128)
    monkeypatch.delenv("SAMPLING_RATE")
    assert MediaConfig.from_env().sampling_rate == 16000


def test_data_seed_columns_and_self_cognition(tmp_path):
    from mvlm.data.dataset_spec import (
        LoadOptions,
        decode_row,
        load_datasets,
        load_one,
        load_options,
        sample_rows,
    )

    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"q": f"hi {i}", "a": f"{{{{NAME}}}} by {{{{AUTHOR}}}} {i}",
                                     "tag": "zh" if i % 2 else "en"}) + "\n"
                         for i in range(20)))
    from mvlm.config import DataConfig

    data = DataConfig.from_flags({"seed": 1, "data_seed": 7,
                                  "columns": '{"q": "query", "a": "response"}',
                                  "model_name": ["小黄", "Xiao Huang"],
                                  "model_author": ["魔搭", "ModelScope"], "use_hf": None,
                                  "hub_token": None})
    opts = load_options(data)
    assert opts.seed == 7  # --data_seed wins for data operations
    raw = load_one(f"{f}#5", options=opts)
    rows = [decode_row(raw.data[i]) for i in range(5)]
    # the same 5 rows as sampling the file with the data seed (not --seed)
    ref = sample_rows(load_one(str(f)).data, 5, 7)
    assert [r["_mvlm_row"] for r in ref] == [raw.data[i]["_mvlm_row"] for i in range(5)]
    ref1 = sample_rows(load_one(str(f)).data, 5, 1)
    assert [r["_mvlm_row"] for r in ref1] != [r["_mvlm_row"] for r in ref]
    for r in rows:
        assert set(r) == {"query", "response", "tag"}
        i = int(r["query"].split()[-1])
        want = "小黄 by 魔搭" if r["tag"] == "zh" else "Xiao Huang by ModelScope"
        assert r["response"] == f"{want} {i}", r
    train, val = load_datasets([str(f)], split_dataset_ratio=0.25, options=LoadOptions(seed=3))
    train2, val2 = load_datasets([str(f)], split_dataset_ratio=0.25, options=LoadOptions(seed=3))
    assert list(val[0].data["_mvlm_row"]) == list(val2[0].data["_mvlm_row"])
    assert len(val[0].data) == 5 and len(train[0].data) == 15


# ----------------------------------------------------------------------------- a real run

@pytest.mark.parametrize("variant", ["lora", "full"])
def test_guide_8_1_script_trains_two_steps(tiny_ckpt, tmp_path, variant):
    """The guide's 8.1 LoRA script, run by bash with `swift` -> `mvlm`: hub model ID and the
    'AI-ModelScope/LaTeX_OCR#N' dataset ID come from an offline HF cache, its own flags stay
    (per-device batch 2 x accumulation 4 of packed padding-free rows, --lora_target_modules ALL,
    --deepspeed zero2, 4 loader workers, 8 encode processes); on top only sizes: 2 steps, one
    rank, short rows, fewer #N rows. ``full`` is its full-parameter variant (--train_type full,
    the --lora_* lines deleted): the HF model is exported instead of an adapter."""
    from mvlm.demo_data import write_demo_dataset

    vl = tiny_ckpt("qwen2_5_vl")
    demo = write_demo_dataset(tmp_path / "demo", n_train=24, n_val=0, image_size=56, seed=3)
    rows = []
    for line in demo.train.read_text().splitlines():  # absolute image paths: any base dir works
        r = json.loads(line)
        r["images"] = [str((demo.root / p).resolve()) for p in r["images"]]
        rows.append(json.dumps(r))
    work = tmp_path / "work"
    work.mkdir()
    (work / "custom_vqa.jsonl").write_text("\n".join(rows) + "\n")
    cache = tmp_path / "hub"
    hf_cache_with(cache, {"Qwen/Qwen2.5-VL-7B-Instruct": vl},
                  {"AI-ModelScope/LaTeX_OCR": {"data/train.jsonl": "\n".join(rows[:12]) + "\n"}})
    overrides = ("--max_steps 2 --max_length 384 --torch_dtype float32 --report_to none "
                 "--logging_steps 1 "
                 "--dataset 'AI-ModelScope/LaTeX_OCR#20' custom_vqa.jsonl")
    runner = (f'swift() {{ shift; NPROC_PER_NODE=1 "{sys.executable}" -m mvlm sft "$@" '
              f"{overrides}; }}\n")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    script = FIX / "guide_8_1_full_sft.sh"
    if variant == "full":
        text = script.read_text().replace("--train_type lora", "--train_type full")
        text = "\n".join(x for x in text.splitlines() if "--lora_" not in x)
        assert "--train_type full" in text and "--lora" not in text
        script = tmp_path / "guide_8_1_full_parameter.sh"
        script.write_text(text + "\n")
    p = subprocess.run(["bash", "-c", runner + f"source {shlex.quote(str(script))}\n"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    out = work / "output" / "sft_latex_ocr"
    recs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2], train
    assert all(0 < r["loss"] < 20 and r["grad_norm"] > 0 for r in train), train
    # micro-batch 2 x DP 1 x accumulation 4 = 8 packed rows per step
    assert train[-1]["consumed_samples"] == 16
    if variant == "full":
        assert not (out / "adapter").exists()
        assert (out / "hf" / "config.json").exists() and list((out / "hf").glob("*.safetensors"))
    else:
        assert (out / "adapter" / "adapter_model.safetensors").exists()
    for line in ("--model Qwen/Qwen2.5-VL-7B-Instruct -> ",
                 "--per_device_train_batch_size 2 -> --micro_batch_size 2",
                 "--gradient_accumulation_steps 4 -> --global_batch_size 8",
                 "--deepspeed zero2 -> --use_distributed_optimizer true",
                 "--model_type ignored", "--learning_rate -> --lr (same meaning)"):
        assert line in log, (line, log[-4000:])
    groups = json.loads((out / "optimizer_groups.json").read_text())
    n = groups["trainable_numel_rank0"]
    if variant == "full":  # ms-swift's defaults: ViT and aligner frozen, the LLM trained in full
        assert "adapters" not in n and n["vit"] == n["aligner"] == 0 and n["llm"] > 0, n
    else:
        assert n["adapters"] > 0 and n["adapters"] < n["total"] / 2, n


def test_megatron_full_script_with_epoch_saves_tb_dir_and_name_freezing(tiny_ckpt, tmp_path):
    """ms-swift's examples/megatron/multimodal/dense/full.sh (NPROC_PER_NODE=2 -> torchrun, TP2 +
    sequence parallel, full recompute, frozen ViT/aligner) plus the trainer-level ms-swift flags
    this issue added: --save_strategy epoch (checkpoint + eval at each epoch's last step),
    --tensorboard_dir, --freeze_parameters (layer 0 of the LLM stays bit-identical)."""
    from helpers import load_all_safetensors
    from safetensors.torch import load_file

    from mvlm.demo_data import write_demo_dataset
    from mvlm.train.args import epoch_end_steps

    vl = tiny_ckpt("qwen2_5_vl")
    demo = write_demo_dataset(tmp_path / "demo", n_train=12, n_val=0, image_size=56, seed=4)
    rows = []
    for line in demo.train.read_text().splitlines():
        r = json.loads(line)
        r["images"] = [str((demo.root / p).resolve()) for p in r["images"]]
        rows.append(json.dumps(r))
    work = tmp_path / "work"
    work.mkdir()
    cache = tmp_path / "hub"
    hf_cache_with(cache, {"Qwen/Qwen2.5-VL-7B-Instruct": vl}, {
        "AI-ModelScope/LaTeX_OCR": {"human_handwrite/train.jsonl": "\n".join(rows) + "\n",
                                    "full/train.jsonl": rows[0] + "\n"}})
    overrides = ("--dataset 'AI-ModelScope/LaTeX_OCR:human_handwrite#6' --packing false "
                 "--max_length 384 --num_train_epochs 2 --save_strategy epoch "
                 "--tensorboard_dir tb --freeze_parameters language_model.decoder.layers.0. "
                 "--torch_dtype float32 --logging_steps 1 --dataset_num_proc 1 "
                 "--dataloader_num_workers 0")
    runner = (f'megatron() {{ shift; "{sys.executable}" -m mvlm sft "$@" {overrides}; }}\n')
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    script = FIX / "swift_megatron_multimodal_dense_full.sh"
    p = subprocess.run(["bash", "-c", runner + f"source {shlex.quote(str(script))}\n"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    assert "NPROC_PER_NODE=2 -> torchrun" in log
    out = work / "megatron_output" / "Qwen2.5-VL-7B-Instruct"
    recs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    # 6 rows, 1% validation split -> 5 train rows; global batch 4; 2 epochs -> 3 steps, the
    # epochs end inside steps 2 (rows 5) and 3 (rows 10)
    assert steps == [1, 2, 3], recs
    ends = epoch_end_steps(5, 4, 3)
    assert ends == {2, 3}
    assert sorted(r["step"] for r in recs if "eval_loss" in r) == [2, 3]
    saved = sorted(int(d.name.split("-")[1]) for d in out.glob("checkpoint-*"))
    assert saved == [2, 3], saved
    assert list((work / "tb").glob("events.out.tfevents.*")) and not (out / "runs").exists()
    before = load_file(str(vl / "model.safetensors"))
    # the export may be one file or several shards + index, whatever the TP layout
    after = load_all_safetensors(out / "hf")
    layer0 = [k for k in before if ".layers.0." in k and "visual" not in k]
    layer1 = [k for k in before if ".layers.1." in k and "visual" not in k]
    assert layer0 and layer1
    assert all(before[k].equal(after[k]) for k in layer0)
    assert sum(not before[k].equal(after[k]) for k in layer1) >= len(layer1) - 2
    assert all(before[k].equal(after[k]) for k in before if "visual" in k)  # ViT + aligner frozen


def test_moe_aux_loss_coeff_reaches_the_megatron_arch(tiny_ckpt, base):
    """--moe_aux_loss_coeff overrides the checkpoint's router_aux_loss_coef in the config the
    model is built from (the tiny Qwen3-MoE has 0.001); the arch then carries it, and the MoE
    layer turns aux-loss load balancing on for any value > 0 (mvlm.models.gpt)."""
    from transformers import AutoConfig

    from mvlm.models.registry import get_family
    from mvlm.train.args import apply_hf_overrides

    hf = AutoConfig.from_pretrained(tiny_ckpt("qwen3_moe"))
    fam = get_family(hf.model_type)
    assert fam.text_arch(hf).moe_aux_loss_coeff == pytest.approx(0.001)
    apply_hf_overrides(parse(base), hf)  # not given: the checkpoint's value stays
    assert fam.text_arch(hf).moe_aux_loss_coeff == pytest.approx(0.001)
    apply_hf_overrides(parse(base, "--moe_aux_loss_coeff", "0.02"), hf)
    assert fam.text_arch(hf).moe_aux_loss_coeff == 0.02
    apply_hf_overrides(parse(base, "--moe_aux_loss_coeff", "0"), hf)
    assert fam.text_arch(hf).moe_aux_loss_coeff == 0.0


def test_recompute_modules_flag(base):
    """--recompute_modules reaches the recompute config (checked by mvlm.models.recompute)."""
    cfg = parse(base, "--recompute_granularity", "selective", "--recompute_modules",
                "core_attn", "mlp")
    assert cfg.parallel.recompute_modules == ["core_attn", "mlp"]
    assert parse(base).parallel.recompute_modules is None
    with pytest.raises(ValueError, match="--recompute_modules"):
        parse(base, "--recompute_granularity", "selective", "--recompute_modules", "moe_act")
    with pytest.raises(ValueError, match="--recompute_modules"):
        parse(base, "--recompute_modules", "core_attn")  # no selective recompute: no effect


def test_guide_3_3_and_6_3_data_flags(offline, base, tmp_path):
    """Issue 9: --packing with --lazy_tokenize encodes up front (one info line); --streaming
    with --num_train_epochs counts the local files' rows; where rows cannot be counted (hub
    IDs, packed rows) or an epoch has no exact end (--save_strategy epoch) it is refused."""
    c = offline["cmds"]["guide_6_3_mixed_modality.sh"][0]
    cfg = parse_train_args(c["argv"], _task(c["cmd"]))
    assert cfg.data.packing and cfg.data.lazy_tokenize is False
    lazy = [n for n in cfg.notes if n.startswith("--lazy_tokenize")]
    assert lazy == ["--lazy_tokenize true with --packing: samples are encoded up front (as "
                    "--lazy_tokenize false), since packing needs every sample's length; this "
                    "changes memory use and start-up time, not what is trained"]
    c = offline["cmds"]["guide_3_3_cpt.sh"][0]
    cfg = parse_train_args(c["argv"], _task(c["cmd"]))
    assert cfg.data.streaming and cfg.schedule.train_iters is None
    assert cfg.schedule.num_train_epochs == 3.0
    stream = [n for n in cfg.notes if n.startswith("--streaming")]
    assert len(stream) == 1 and "steps = ceil(3 x 7 rows / global batch size)" in stream[0]
    assert "not encodable samples" in stream[0]
    # #N caps the streamed rows; .json elements, CSV records and parquet footers are counted
    from mvlm.data.textrows import count_rows

    d = tmp_path
    (d / "a.json").write_text(json.dumps([{"q": i} for i in range(5)]))
    (d / "b.csv").write_text('q,a\n1,"x\ny"\n\n2,z\n')
    import datasets

    datasets.Dataset.from_dict({"q": list(range(9))}).to_parquet(str(d / "c.parquet"))
    assert [count_rows(str(d / n)) for n in ("a.json", "b.csv", "c.parquet")] == [5, 2, 9]
    assert count_rows(f"{d / 'c.parquet'}#4") == 4 and count_rows(f"{d / 'a.json'}#50") == 5
    assert count_rows(str(d)) is None and count_rows("org/name") is None
    cfg = parse(base, "--streaming", "true", "--dataset", f"{d / 'a.json'}", f"{d / 'b.csv'}#1")
    assert any("ceil(1 x 6 rows" in n for n in cfg.notes)
    with pytest.raises(ValueError, match=r"--streaming: .*'org/name' cannot be counted.*"
                                         r"--max_steps"):
        parse(base, "--streaming", "true", "--dataset", "org/name")
    with pytest.raises(ValueError, match="--streaming: .*packed rows.*--max_steps"):
        parse(base, "--streaming", "true", "--packing", "true", "--max_length", "64")
    with pytest.raises(ValueError, match="--save_strategy epoch: a streamed dataset"):
        parse(base, "--streaming", "true", "--max_steps", "4", "--save_strategy", "epoch")
    cfg = parse(base, "--streaming", "true", "--packing", "true", "--max_length", "64",
                "--max_steps", "3")
    assert cfg.schedule.train_iters == 3


def test_guide_3_3_streams_epochs_and_logs_skipped_rows(tiny_ckpt, tmp_path):
    """The guide's 3.3 CPT script (--streaming true --num_train_epochs 3, no step count), run
    by bash with `swift` -> `mvlm`, on a local file of 8 rows of which 2 are bad (one not UTF-8,
    one not JSON), with --on_bad_sample skip; on top only sizes (one rank, float32, gradient
    accumulation 1 -> global batch 2, short rows). Steps = ceil(3 x 8 rows / 2) = 12, while a
    pass yields 6 samples (3 steps): the stream must go on into a 4th pass. The 2 skipped rows
    are counted once and reported in the final record of logging.jsonl and in one log line."""
    vl = tiny_ckpt("qwen2_5_vl")
    work = tmp_path / "work"
    work.mkdir()
    good = [json.dumps({"messages": [{"role": "user", "content": f"note {i}"},
                                     {"role": "assistant", "content": "text " * (i + 1)}]})
            .encode() for i in range(6)]
    lines = good[:2] + [b'{"messages": [\xff\xfe]}'] + good[2:4] + [b"{broken"] + good[4:]
    (work / "medical_image_corpus.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cache = tmp_path / "hub"
    hf_cache_with(cache, {"Qwen/Qwen2.5-VL-7B-Instruct": vl}, {})
    overrides = ("--torch_dtype float32 --gradient_accumulation_steps 1 --max_length 128 "
                 "--report_to none --logging_steps 1 --on_bad_sample skip "
                 "--save_strategy no --save_safetensors false")
    runner = (f'swift() {{ shift; NPROC_PER_NODE=1 "{sys.executable}" -m mvlm pt "$@" '
              f"{overrides}; }}\n")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    env.pop("MAX_PIXELS", None)
    script = FIX / "guide_3_3_cpt.sh"
    p = subprocess.run(["bash", "-c", runner + f"source {shlex.quote(str(script))}\n"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    recs = [json.loads(x) for x in (work / "output" / "cpt_vlm" / "logging.jsonl")
            .read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13)), train
    assert all(0 < r["loss"] < 20 for r in train), train
    assert train[-1]["consumed_samples"] == 24
    assert train[-1]["bad_samples_skipped"] == 2
    assert train[-1]["bad_samples_by_reason"] == {"bad_encoding": 1, "bad_json": 1}
    assert all("bad_samples_skipped" not in r for r in train[:-1])
    assert "steps = ceil(3 x 8 rows / global batch size)" in log, log[-4000:]
    assert log.count("bad samples: skipped samples: 2 (bad_encoding=1, bad_json=1)") == 1, \
        log[-4000:]


@pytest.mark.parametrize("name,out,part", [
    ("guide_4_3_sft_lora.sh", "sft_qwen2_5_vl", "adapters"),
    ("guide_7_1_stage1_aligner.sh", "stage1_aligner", "aligner"),
    ("guide_7_1_stage2_full.sh", "stage2_full", "all"),
])
def test_more_guide_scripts_train_two_steps(tiny_ckpt, tmp_path, name, out, part):
    """The guide's 4.3 (LoRA, packing, micro-batch 2 x accumulation 4, flash_attn asked for on a
    CPU) and 7.1 scripts (stage 1: only the aligner trains; stage 2: everything trains, starting
    from stage 1's --output_dir, i.e. its HF export), run by bash with `swift` -> `mvlm`, the hub
    model ID from an offline HF cache; on top only sizes: 2 steps, one rank, short rows."""
    from mvlm.demo_data import write_demo_dataset

    vl = tiny_ckpt("qwen2_5_vl")
    demo = write_demo_dataset(tmp_path / "demo", n_train=16, n_val=0, image_size=56, seed=5)
    rows = []
    for line in demo.train.read_text().splitlines():
        r = json.loads(line)
        r["images"] = [str((demo.root / p).resolve()) for p in r["images"]]
        rows.append(json.dumps(r))
    work = tmp_path / "work"
    work.mkdir()
    for f in ("custom_vqa_dataset.jsonl", "stage1_data.jsonl", "stage2_data.jsonl"):
        (work / f).write_text("\n".join(rows) + "\n")
    cache = tmp_path / "hub"
    hf_cache_with(cache, {"Qwen/Qwen2.5-VL-7B-Instruct": vl}, {})
    overrides = ("--max_steps 2 --max_length 384 --torch_dtype float32 --report_to none "
                 "--logging_steps 1")
    runner = (f'swift() {{ shift; NPROC_PER_NODE=1 "{sys.executable}" -m mvlm sft "$@" '
              f"{overrides}; }}\n")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    scripts = [FIX / name]
    if name == "guide_7_1_stage2_full.sh":  # the guide runs stage 1 first, in the same dir
        scripts.insert(0, FIX / "guide_7_1_stage1_aligner.sh")
    src = "".join(f"source {shlex.quote(str(s))} || exit 1\n" for s in scripts)
    p = subprocess.run(["bash", "-c", runner + src],
                       cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    run = work / "output" / out
    recs = [json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2], train
    assert all(0 < r["loss"] < 20 and r["grad_norm"] > 0 for r in train), train
    n = json.loads((run / "optimizer_groups.json").read_text())["trainable_numel_rank0"]
    if part == "adapters":  # LoRA on the LLM; ms-swift's default freezes ViT and aligner
        assert n["adapters"] > 0 and n["adapters"] < n["total"] / 2, n
        assert (run / "adapter" / "adapter_model.safetensors").exists()
    elif part == "aligner":  # --freeze_vit true --freeze_llm true --freeze_aligner false
        assert n["aligner"] > 0 and n["vit"] == n["llm"] == 0, n
        assert (run / "hf" / "config.json").exists()
    else:  # stage 2: every part unfrozen, weights from stage 1's export
        assert n["aligner"] > 0 and n["vit"] > 0 and n["llm"] > 0, n
        stage1 = work / "output" / "stage1_aligner" / "hf"
        assert "--model output/stage1_aligner is an mvlm training run -> its HF export " \
               "output/stage1_aligner/hf" in log, log[-4000:]
        assert (stage1 / "config.json").exists() and (run / "hf" / "config.json").exists()
