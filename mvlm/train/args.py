"""`mvlm pt` / `mvlm sft` flags: ms-swift (Megatron-SWIFT) names, HF-Trainer and Megatron aliases.

Why a mapping layer: users arrive with scripts written for ``megatron sft`` (Megatron flag names)
or ``swift sft`` (HF-Trainer names). Those scripts must run with only the command name changed, so
every flag they use is either

* accepted under its own name with the same meaning (``--learning_rate`` is ``--lr``),
* mapped onto the Megatron concept that carries its intent, with ONE info line saying what it
  became (``--deepspeed zero2`` -> distributed optimizer, ``--per_device_train_batch_size`` ->
  ``--micro_batch_size``, ``--gradient_accumulation_steps`` -> part of ``--global_batch_size``), or
* refused with a message naming the mvlm equivalent (``--fsdp``).

``--config run.yaml`` gives the same flags as a YAML mapping; flags on the command line win.
Everything is validated up front (before any process group exists) with errors that name the flag
and the fix: a wrong flag must never cost a cluster allocation. The result is the typed, nested
:class:`mvlm.config.TrainConfig`; the argparse namespace stays inside this module.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any

from mvlm.config import (  # the typed config this module builds (light: stdlib only)
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    FreezeConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    TunerConfig,
)
from mvlm.data.flags import parse_columns, str2bool  # one parser for data and train flags
from mvlm.models.recompute import RecomputeConfig, RecomputeError  # light: stdlib only

__all__ = ["TrainConfig", "parse_train_args", "build_parser", "apply_hf_overrides",
           "epoch_end_steps", "iterations_for_epochs", "write_flag_doc"]

log = logging.getLogger("mvlm.train")




def _bool(p: argparse._ActionsContainer, *names: str, default: bool | None = False,
          dest: str | None = None, help: str | None = None) -> None:  # noqa: A002 - argparse's own keyword
    kw: dict[str, Any] = {"type": str2bool, "nargs": "?", "const": True, "default": default,
                          "help": help}
    if dest:
        kw["dest"] = dest
    p.add_argument(*names, **kw)


# Same meaning, other spelling: (alias, canonical). Each use logs one info line.
SAME_MEANING: dict[str, str] = {
    "--learning_rate": "--lr",
    "--max_grad_norm": "--clip_grad",
    "--warmup_ratio": "--lr_warmup_fraction",
    "--warmup_steps": "--lr_warmup_iters",
    "--lr_scheduler_type": "--lr_decay_style",
    "--max_steps": "--train_iters",
    "--max_epochs": "--num_train_epochs",
    "--tensor_parallel_size": "--tp",
    "--tensor_model_parallel_size": "--tp",
    "--pipeline_model_parallel_size": "--pp",
    "--context_parallel_size": "--cp",
    "--expert_model_parallel_size": "--ep",
    "--expert_tensor_parallel_size": "--etp",
    "--virtual_pipeline_model_parallel_size": "--vpp",
    "--save_steps": "--save_interval",
    "--eval_steps": "--eval_interval",
    "--logging_steps": "--log_interval",
    "--save": "--output_dir",
    "--load": "--mcore_model",
    "--num_workers": "--dataloader_num_workers",
    "--attention_backend": "--attn_impl",
    "--report_to": "--report_to",
    # ms-swift 4 spellings
    "--tuner_type": "--train_type",
    "--adam_epsilon": "--adam_eps",
    "--tensorboard_dir": "--logging_dir",
    "--sequence_parallel_size": "--cp",
}

# Why an alias means what it maps to, where the name alone does not say it (the info line).
ALIAS_WHY: dict[str, str] = {
    "--tuner_type": "ms-swift 4's name for --train_type",
    "--sequence_parallel_size": "ms-swift's sequence parallelism splits every sequence over N "
                                "ranks with exact attention over the whole sequence, as "
                                "Megatron context parallelism does; DP shrinks by N in both",
    "--tensorboard_dir": "Megatron-SWIFT's name for the tensorboard directory",
}

# Accepted and ignored, with the reason. Only flags that cannot change what is trained (the loss,
# the data order, the weights written) belong here: speed/memory/bookkeeping switches and names
# of things mvlm reads from the checkpoint. Anything that changes training is implemented (a
# flag of the parser) or REFUSED.
IGNORED: dict[str, str] = {
    "--model_type": "the family is read from the checkpoint's config.json",
    "--template": "mvlm always uses the checkpoint family's own chat template (ms-swift's "
                  "default for the model); a different template name is not applied",
    "--per_device_eval_batch_size": "eval batches use --micro_batch_size (the eval loss is a "
                                    "token mean over the evaluated rows either way)",
    "--eval_strategy": "evaluation runs every --eval_interval steps",
    "--evaluation_strategy": "evaluation runs every --eval_interval steps",
    "--logging_strategy": "logging happens every --log_interval steps",
    "--load_from_cache_file": "mvlm re-encodes the dataset at every start (its encode step "
                              "never reuses a cache file; the result is the same each run); "
                              "to skip re-encoding, run `mvlm encode` once and train with "
                              "--cached_dataset",
    "--vit_gradient_checkpointing": "memory only, same numerics: mvlm keeps the ViT's "
                                    "activations (lower MAX_PIXELS if the ViT runs out of memory)",
    "--max_shard_size": "the HF export writes one safetensors shard per rank plus an index, "
                        "which transformers and vLLM load like any sharding",
    "--create_checkpoint_symlink": "<output_dir>/latest already names the newest checkpoint",
    "--add_version": "checkpoints go straight into --output_dir (that is what makes a rerun "
                     "resume)",
    "--check_model": "mvlm reads the checkpoint files as they are (no hash check)",
    "--ddp_find_unused_parameters": "Megatron-Core DDP reduces the grad buffer of every "
                                    "trainable parameter; there is nothing to search",
    "--experts_impl": "a transformers MoE kernel choice; mvlm runs Megatron-Core's MoE layer",
    "--async_save": "checkpoints are written synchronously (the same files)",
    "--attention_softmax_in_fp32": "the SDPA/flash kernels accumulate the softmax in fp32",
    "--use_liger_kernel": "Liger's fused kernels patch transformers modules; mvlm's Megatron "
                          "modules compute the same loss without them",
    "--dataloader_pin_memory": "host-to-device copy speed only",
    "--dataloader_persistent_workers": "worker start-up cost only",
    "--dataloader_prefetch_factor": "loader look-ahead only",
    "--offload_bridge": "used by ms-swift's GRPO weight sync only",
    "--cross_entropy_loss_fusion": "the vocab-parallel cross entropy is always used",
    "--moe_grouped_gemm": "the local expert MLP is used where grouped GEMM is unavailable",
    "--moe_shared_expert_overlap": "no effect on the local spec",
    "--moe_permute_fusion": "no effect on the local spec",
    "--no_save_rng": "RNG state is small and always saved",
    "--ddp_backend": "gloo on CPU, NCCL on GPU",
    "--ddp_timeout": "uses the 30 minute default",
    "--overlap_param_gather": "kept off (CPU/gloo safe)",
    "--dataloader_drop_last": "the sampler always yields full global batches",
    "--remove_unused_columns": "the collator keeps exactly the batch contract",
    "--gradient_checkpointing_kwargs": "see --recompute_granularity",
    "--finetune": "a fresh --model/--mcore_model always starts at step 0 (resume uses --resume)",
    "--no_load_optim": "--mcore_model loads weights only; --resume restores the optimizer",
    "--no_load_rng": "--mcore_model loads weights only",
}

# Mapped onto another flag's value (one info line each).
MAPPED: dict[str, str] = {
    "--bf16": "--torch_dtype bfloat16 (when --torch_dtype is not given)",
    "--fp16": "--torch_dtype float16 (when --torch_dtype is not given; float16 training is "
              "refused: use bfloat16)",
}

# Cannot apply: refused with the reason and the mvlm alternative.
REFUSED: dict[str, str] = {
    "--fsdp": "use --use_distributed_optimizer true (ZeRO-style sharding of optimizer state)",
    "--fsdp_config": "use --use_distributed_optimizer true",
    "--deepspeed_config": "use --use_distributed_optimizer true",
    "--torch_compile": "not supported yet; remove the flag",
    "--decoder_first_pipeline_num_layers": "mvlm splits the decoder layers evenly over the "
                                           "--pp stages: choose a --pp that divides the layer "
                                           "count (or add --vpp)",
    "--decoder_last_pipeline_num_layers": "mvlm splits the decoder layers evenly over the --pp "
                                          "stages: choose a --pp that divides the layer count "
                                          "(or add --vpp)",
    "--pipeline_model_parallel_layout": "mvlm splits the decoder layers evenly over the --pp "
                                        "stages: choose --pp/--vpp instead",
    "--optimizer_cpu_offload": "optimizer state stays on the device: shard it over more DP "
                               "ranks (--use_distributed_optimizer true, the default) or train "
                               "adapters (--train_type lora)",
    "--optimizer_offload_fraction": "no optimizer CPU offload in mvlm: use "
                                    "--use_distributed_optimizer true or --train_type lora",
    "--use_precision_aware_optimizer": "needs Transformer Engine's fused Adam; mvlm keeps fp32 "
                                       "master weights and Adam state",
    "--num_labels": "sequence classification (--task_type seq_cls) is not implemented: mvlm "
                    "trains causal LMs (sft/pt); phrase the labels as answers for sft",
    "--problem_type": "sequence classification (--task_type seq_cls) is not implemented",
    "--agent_template": "mvlm has no agent/tool-call templates: render tool calls into the "
                        "messages' text before training",
    "--external_plugins": "mvlm loads no plugins: convert custom data to ms-swift JSONL "
                          "(messages/images) and use a supported model family",
    "--lorap_lr_ratio": "LoRA+ (a larger LR for the B matrices) is not implemented: use --lr",
    "--moe_expert_capacity_factor": "mvlm's MoE is dropless (no expert capacity): remove it",
    "--moe_router_dtype": "the router runs in the parameter dtype: train with --torch_dtype "
                          "float32 for an fp32 router",
    "--group_by_length": "length grouping is not implemented: --packing true balances "
                         "tokens per micro-batch instead",
    "--lr_decay_iters": "the LR decays over --train_iters (or the epochs' steps): set those",
    "--use_galore": "GaLore is not implemented: use --train_type lora or "
                    "--use_distributed_optimizer true to save memory",
    "--quant_method": "quantised (QLoRA) training is not implemented: use --train_type lora",
    "--quant_bits": "quantised (QLoRA) training is not implemented: use --train_type lora",
    "--rope_scaling": "mvlm uses the checkpoint's own rope settings: edit config.json",
    "--new_special_tokens": "adding tokens (embedding resize) is not implemented: use a "
                            "checkpoint whose tokenizer already has them",
    "--enable_dft_loss": "DFT loss is not implemented (mvlm trains plain token cross-entropy)",
    "--enable_channel_loss": "per-channel loss is not implemented (mvlm trains plain token "
                             "cross-entropy)",
}


def _flag_of(token: str) -> str | None:
    if not token.startswith("--"):
        return None
    return token.split("=", 1)[0]


def build_parser(task: str) -> argparse.ArgumentParser:
    """The full `mvlm pt|sft` parser (training + data flags)."""
    p = argparse.ArgumentParser(prog=f"mvlm {task}", allow_abbrev=False,
                                description=f"{'continued pre-training' if task == 'pt' else 'SFT'}"
                                " of a VLM on Megatron-Core (any TP/PP/CP/EP/DP layout)")
    add_train_args(p)
    return p


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--config", default=None, help="YAML file of flags; the command line wins")
    g.add_argument("--model", default=None, help="HF checkpoint dir, loaded into the sharded model")
    g.add_argument("--mcore_model", default=None,
                   help="mvlm torch_dist checkpoint (mvlm convert --to mcore, or a training run)")
    _bool(g, "--load_safetensors", default=None,
          help="Megatron-SWIFT: --model is an HF safetensors dir (always true in mvlm)")
    g.add_argument("--train_type", default="full", choices=["full", "lora", "dora", "lora_llm"],
                   help="full | lora | dora | lora_llm (adapters on the LLM, ViT/aligner per "
                        "the freeze flags); adapter flags: mvlm.tuners.train_hooks")
    g.add_argument("--torch_dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (default: the checkpoint's)")
    g.add_argument("--attn_impl", default=None,
                   help="core attention kernel: flash_attn (flash-attn varlen; SDPA with one "
                        "warning where it cannot run), sdpa (torch SDPA only), eager (explicit "
                        "matmul-softmax), auto (default: flash-attn where it runs; on CPU, "
                        "causal attention without packing, CP or dropout that is large enough "
                        "and short enough runs mvlm.runtime.causal_blocks (GEMMs over query "
                        "blocks); else SDPA; --verify compares with SDPA). "
                        "Megatron names: flash, fused (=sdpa), unfused (=eager), local (=eager "
                        "on the local spec). The TE spec maps them onto its attention backend. "
                        "Applies to the LLM decoder; the HF vision tower picks its own.")
    g.add_argument("--transformer_impl", default="auto", choices=["auto", "te", "local"])
    g.add_argument("--device", default=None, choices=["cpu", "cuda"])

    g = p.add_argument_group("schedule")
    g.add_argument("--num_train_epochs", type=float, default=None)
    g.add_argument("--train_iters", type=int, default=None)
    g.add_argument("--micro_batch_size", type=int, default=None)
    g.add_argument("--per_device_train_batch_size", type=int, default=None)
    g.add_argument("--global_batch_size", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=None)
    g.add_argument("--lr", type=float, default=None,
                   help="peak LR; default as in ms-swift: 1e-5 for full training, 1e-4 with "
                        "adapters (--train_type lora|dora|lora_llm)")
    g.add_argument("--min_lr", type=float, default=0.0)
    g.add_argument("--lr_decay_style", default="cosine",
                   help="cosine|linear|constant (HF names: cosine, linear, constant, "
                        "constant_with_warmup, cosine_with_min_lr)")
    g.add_argument("--lr_warmup_fraction", type=float, default=None)
    g.add_argument("--lr_warmup_iters", type=int, default=0)
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.95)
    g.add_argument("--adam_eps", type=float, default=1e-8)
    g.add_argument("--clip_grad", type=float, default=1.0)
    g.add_argument("--vit_lr", type=float, default=None)
    g.add_argument("--aligner_lr", type=float, default=None)
    _bool(g, "--freeze_vit", default=None,
          help="default true, as in ms-swift (false with --train_type lora_llm, which trains "
               "the ViT in full): pass --freeze_vit false to train the vision tower")
    _bool(g, "--freeze_aligner", default=None,
          help="default true, as in ms-swift (false with --train_type lora_llm)")
    _bool(g, "--freeze_llm", default=False)
    g.add_argument("--freeze_parameters", nargs="*", default=[],
                   help="freeze parameters whose name starts with one of these prefixes: "
                        "Megatron-Core names as Megatron-SWIFT uses them (e.g. "
                        "language_model.decoder.layers.0. or vision_model.blocks.; layer "
                        "numbers are those of each pipeline stage's chunk with --pp > 1); "
                        "applied after the --freeze_vit/aligner/llm part flags")
    g.add_argument("--freeze_parameters_regex", default=None,
                   help="freeze parameters whose name matches this regex (re.search)")
    g.add_argument("--freeze_parameters_ratio", type=float, default=0.0,
                   help="0 (nothing) or 1 (everything, then --trainable_parameters re-enables "
                        "parts); fractions are refused")
    g.add_argument("--trainable_parameters", nargs="*", default=[],
                   help="prefixes kept trainable; wins over every freeze flag")
    g.add_argument("--trainable_parameters_regex", default=None,
                   help="regex of parameters kept trainable; wins over every freeze flag")
    from mvlm.tuners.train_hooks import add_adapter_args  # mvlm.tuners: LoRA/DoRA flags

    add_adapter_args(p)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tp", type=int, default=1)
    g.add_argument("--pp", type=int, default=1)
    g.add_argument("--cp", type=int, default=1)
    g.add_argument("--ep", type=int, default=1)
    g.add_argument("--etp", type=int, default=None)
    g.add_argument("--vpp", type=int, default=None)
    _bool(g, "--sequence_parallel")
    _bool(g, "--use_distributed_optimizer", default=None)
    g.add_argument("--recompute_granularity", default=None, choices=["full", "selective", "none"])
    g.add_argument("--recompute_method", default=None, choices=["uniform", "block"],
                   help="full recompute: uniform (checkpoint every --recompute_num_layers layers; "
                        "default) or block (only the first N layers of each pipeline stage)")
    g.add_argument("--recompute_num_layers", type=int, default=None,
                   help="full recompute: layers per checkpoint (uniform) or checkpointed layers "
                        "per pipeline stage (block); default 1")
    _bool(g, "--gradient_checkpointing", default=None)
    g.add_argument("--deepspeed", default=None,
                   help="HF-Trainer: zero0|zero1|zero2|zero3 -> (distributed) optimizer")
    _bool(g, "--overlap_grad_reduce")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None)
    g.add_argument("--eval_interval", type=int, default=None)
    g.add_argument("--eval_iters", type=int, default=None,
                   help="global batches per evaluation (default: the whole validation set)")
    g.add_argument("--save_interval", type=int, default=None)
    g.add_argument("--save_total_limit", type=int, default=None)
    _bool(g, "--save_safetensors", default=True)
    _bool(g, "--save_final_checkpoint", default=True,
          help="write a checkpoint after the last step (besides --save_interval ones)")
    _bool(g, "--save_only_model")
    _bool(g, "--no_save_optim")
    g.add_argument("--resume", nargs="?", const="auto", default="auto",
                   help="auto (default: continue from <output_dir>/latest if it exists), "
                        "a checkpoint dir, or 'none'")
    g.add_argument("--resume_from_checkpoint", default=None, help="HF-Trainer name of --resume")
    g.add_argument("--exit_interval", type=int, default=None,
                   help="stop (after saving) once the step is a multiple of this")
    g.add_argument("--log_interval", type=int, default=1)
    g.add_argument("--report_to", nargs="+", default=["tensorboard"],
                   help="tensorboard|wandb|none (several allowed)")
    g.add_argument("--logging_dir", default=None,
                   help="tensorboard event directory (default <output_dir>/runs); "
                        "Megatron-SWIFT: --tensorboard_dir")
    g.add_argument("--save_strategy", default="steps", choices=["steps", "epoch", "no"],
                   help="steps: every --save_interval; epoch: at the end of every epoch "
                        "(--save_interval and --eval_interval become the steps per epoch); "
                        "no: no intermediate checkpoints (the final one is still written)")
    g.add_argument("--wandb_project", default="mvlm")
    g.add_argument("--wandb_exp_name", default=None)
    _bool(g, "--padding_free", default=None)
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    _bool(g, "--check_for_nan_in_loss_and_grad", default=True,
          help="check every step's loss and grad norm before the update; a NaN/inf stops the run "
               "naming the step (or skips the update, see --max_skipped_steps)")
    g.add_argument("--max_skipped_steps", type=int, default=0,
                   help="steps with a NaN/inf loss or grad norm whose update is skipped before "
                        "the run stops (needs --check_for_nan_in_loss_and_grad true)")
    _bool(g, "--disable_tqdm")

    add_swift_args(p)

    # Accepted-and-ignored / refused flags get their own entries so argparse knows them.
    g = p.add_argument_group("compatibility (accepted for ms-swift scripts)")
    for flag in list(IGNORED) + list(MAPPED) + list(REFUSED):
        if flag in ("--bf16", "--fp16", "--finetune", "--no_load_optim", "--no_load_rng",
                    "--no_save_rng", "--cross_entropy_loss_fusion",
                    "--moe_grouped_gemm", "--moe_shared_expert_overlap", "--moe_permute_fusion",
                    "--overlap_param_gather", "--dataloader_drop_last", "--torch_compile",
                    "--use_liger_kernel", "--remove_unused_columns"):
            _bool(g, flag, default=None, dest="_compat_" + flag[2:])
        else:
            g.add_argument(flag, default=None, dest="_compat_" + flag[2:], nargs="*")
    for alias, canon in SAME_MEANING.items():
        if alias == canon:
            continue
        action = p._option_string_actions[canon]
        p._option_string_actions[alias] = action
        action.option_strings.append(alias)

    from mvlm.data.encode import add_data_args

    add_data_args(p)


def add_swift_args(p: argparse.ArgumentParser) -> None:
    """ms-swift / Megatron-SWIFT flags that change training, implemented (or value-checked in
    :func:`_validate_swift`, which refuses the values mvlm cannot honour with the reason)."""
    g = p.add_argument_group("ms-swift data, hub and loss flags")
    _bool(g, "--use_hf", default=None,
          help="hub IDs: true = Hugging Face; false (ms-swift's default) = ModelScope when the "
               "modelscope package is installed, else Hugging Face. The local HF cache is "
               "always tried first (mvlm.hub)")
    g.add_argument("--hub_token", default=None, help="token for hub downloads")
    g.add_argument("--model_revision", default=None, help="hub revision of --model")
    g.add_argument("--data_seed", type=int, default=None,
                   help="seed of the dataset operations (#N sampling, the validation split, "
                        "the dataset shuffle); default: --seed")
    g.add_argument("--columns", default=None,
                   help='rename dataset columns before rows are read: \'{"src": "dst"}\'')
    _bool(g, "--strict", default=None,
          help="true: a malformed row stops the run (--on_bad_sample error); false: it is "
               "skipped and counted (--on_bad_sample skip)")
    g.add_argument("--packing_length", type=int, default=None,
                   help="packed row length (default --max_length, which stays the per-sample "
                        "limit)")
    g.add_argument("--loss_scale", default=None,
                   help="default (sft: every assistant turn) | ignore_empty_think (as default, "
                        "but an empty think block opening a turn carries no loss) | all (every "
                        "text token, as mvlm pt); default: 'default' for sft, 'all' for pt")
    _bool(g, "--add_non_thinking_prefix", default=None,
          help="true: assistant turns that do not open with <think> get the family's empty "
               "think block (Qwen3: <think>\\n\\n</think>\\n\\n), every turn; default false")
    g.add_argument("--model_name", nargs="+", default=None,
                   help="self-cognition data: replaces {{NAME}} (zh name, en name)")
    g.add_argument("--model_author", nargs="+", default=None,
                   help="self-cognition data: replaces {{AUTHOR}} (zh, en)")
    g.add_argument("--task_type", default="causal_lm",
                   help="causal_lm only (seq_cls/embedding/reranker are not implemented)")
    g.add_argument("--moe_aux_loss_coeff", type=float, default=None,
                   help="MoE load-balancing loss weight (default: the checkpoint's "
                        "router_aux_loss_coef); > 0 turns the aux loss on")
    g.add_argument("--lr_scheduler_kwargs", default=None,
                   help='HF-Trainer: JSON; {"min_lr": x} -> --min_lr x')
    g.add_argument("--neftune_noise_alpha", type=float, default=0.0,
                   help="0 only (NEFTune noise is not implemented)")
    g.add_argument("--recompute_modules", nargs="+", default=None,
                   help="selective recompute submodules (core_attn mlp layernorm moe "
                        "shared_experts); needs --recompute_granularity selective")
    g.add_argument("--optimizer", default="adam",
                   help="adam (Megatron's Adam with decoupled weight decay = AdamW) only")
    g.add_argument("--optim", default=None,
                   help="HF-Trainer optimizer name: the adamw_* variants map to Megatron's Adam "
                        "(AdamW); others are refused")
    g.add_argument("--tuner_backend", default="peft",
                   help="peft only (mvlm's own LoRA/DoRA on Megatron layers, saved in PEFT's "
                        "format)")


def yaml_to_argv(path: str) -> list[str]:
    """A YAML mapping of flags -> CLI tokens (placed before the command line, which then wins)."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag: value, got "
                         f"{type(data).__name__}")
    out: list[str] = []
    for k, v in data.items():
        flag = "--" + str(k).lstrip("-")
        if v is None:
            continue
        if isinstance(v, list):
            out += [flag, *[str(x) for x in v]]
        elif isinstance(v, bool):
            out += [flag, "true" if v else "false"]
        else:
            out += [flag, str(v)]
    return out


_DECAY = {"cosine": "cosine", "linear": "linear", "constant": "constant",
          "constant_with_warmup": "constant", "cosine_with_min_lr": "cosine",
          "wsd": None, "inverse-square-root": "inverse-square-root"}
# --attn_impl / --attention_backend spellings -> mvlm's kernel names (mvlm.models.gpt.ATTN_IMPLS).
# Megatron's 'local' is its unfused local-spec attention, 'fused'/'unfused' are TE's switches.
_ATTN = {None: "auto", "auto": "auto", "flash_attn": "flash", "flash": "flash",
         "flash_attention_2": "flash", "sdpa": "sdpa", "eager": "eager", "local": "eager",
         "fused": "sdpa", "unfused": "eager"}


def parse_train_args(argv: list[str], task: str) -> TrainConfig:
    """Parse + map + validate. Raises ValueError naming the flag and the fix."""
    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        if not os.path.exists(known.config):
            raise FileNotFoundError(f"--config {known.config} does not exist")
        argv = yaml_to_argv(known.config) + argv
    notes: list[str] = []
    used = [f for f in (_flag_of(t) for t in argv) if f]
    for flag in dict.fromkeys(used):
        if flag in REFUSED:
            raise ValueError(f"{flag} cannot apply to Megatron training: {REFUSED[flag]}")
        if flag in SAME_MEANING and SAME_MEANING[flag] != flag:
            why = ALIAS_WHY.get(flag, "same meaning")
            notes.append(f"{flag} -> {SAME_MEANING[flag]} ({why})")
        if flag in IGNORED:
            notes.append(f"{flag} ignored: {IGNORED[flag]}")
        if flag in MAPPED:
            notes.append(f"{flag} -> {MAPPED[flag]}")
    parser = build_parser(task)
    _check_spellings(argv, parser)
    ns = parser.parse_args(argv)
    ns.task = task
    return _validate(ns, task, notes)


# Values of native flags that mvlm cannot honour (argparse would only say "invalid choice").
REFUSED_VALUES: dict[tuple[str, str], str] = {
    ("--truncation_strategy", "split"): "splitting one long sample into several is not "
    "implemented: use left/right (truncate) or delete (drop), or split the text in the data",
}


def _flag_values(argv: list[str]) -> list[tuple[str, list[str]]]:
    """(flag, its value tokens) in command-line order (``--f=v`` and ``--f v1 v2`` forms)."""
    out: list[tuple[str, list[str]]] = []
    for t in argv:
        if t.startswith("--"):
            flag, eq, val = t.partition("=")
            out.append((flag, [val] if eq else []))
        elif out:
            out[-1][1].append(t)
    return out


def _check_spellings(argv: list[str], parser: argparse.ArgumentParser | None = None) -> None:
    """Refused values, and two spellings of one flag with different values (argparse would keep
    the last one silently: ``--tuner_type lora ... --train_type full`` must not train in full)."""
    seen: dict[str, tuple[str, list[str]]] = {}
    for flag, vals in _flag_values(argv):
        for v in vals:
            if (flag, v) in REFUSED_VALUES:
                raise ValueError(f"{flag} {v}: {REFUSED_VALUES[(flag, v)]}")
        action = parser._option_string_actions.get(flag) if parser is not None else None
        canon = action.option_strings[0] if action is not None else SAME_MEANING.get(flag, flag)
        if canon in seen and seen[canon][0] != flag and seen[canon][1] != vals:
            other, ov = seen[canon]
            raise ValueError(f"{flag} {' '.join(vals)} contradicts {other} {' '.join(ov)} (the "
                             f"same setting, {canon}): pass it once")
        seen[canon] = (flag, vals)


def _early_swift(ns: argparse.Namespace, notes: list[str]) -> None:
    """ms-swift flags that must act before the generic checks: hub IDs for --model (the
    directory check follows), --packing_length (the packing check follows)."""
    if ns.model and not os.path.exists(ns.model):
        from mvlm.hub import is_repo_id, resolve_model

        if is_repo_id(ns.model):
            path = resolve_model(ns.model, use_hf=ns.use_hf, revision=ns.model_revision,
                                 token=ns.hub_token)
            notes.append(f"--model {ns.model} -> {path} (hub ID, resolved by mvlm.hub)")
            ns.model = path
    if ns.packing_length is not None:
        if ns.packing_length < 2:
            raise ValueError("--packing_length: must be >= 2")
        if not (ns.packing or ns.padding_free):
            raise ValueError("--packing_length: only used with --packing true")
        if ns.max_length is None:
            ns.max_length = ns.packing_length
            notes.append(f"--packing_length {ns.packing_length}: also the per-sample "
                         "--max_length (none given)")
        elif ns.packing_length < ns.max_length:
            raise ValueError(f"--packing_length {ns.packing_length} is shorter than --max_length "
                             f"{ns.max_length}: a sample of max_length would not fit a row")


def _json_arg(flag: str, value: str | None) -> dict[str, Any]:
    import json

    if value in (None, ""):
        return {}
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {value!r}: expected a JSON object ({e})") from e
    if not isinstance(out, dict):
        raise ValueError(f"{flag} {value!r}: expected a JSON object")
    return out


_LOSS_SCALE_TASK = {"default": "sft", "all": "pt", "ignore_empty_think": "sft",
                    "default+ignore_empty_think": "sft"}
_IGNORE_EMPTY_THINK = ("ignore_empty_think", "default+ignore_empty_think")
_ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw", "adam",
                "adamw_apex_fused")


def _validate_swift(ns: argparse.Namespace, task: str, notes: list[str]) -> None:
    """Value checks and mappings of the ms-swift flags (see add_swift_args), applied to ``ns``."""
    import re

    def bad(flag: str, msg: str) -> ValueError:
        return ValueError(f"{flag}: {msg}")

    if ns.task_type != "causal_lm":
        raise bad("--task_type", f"{ns.task_type}: only causal_lm is implemented (sft/pt); "
                                 "sequence classification, embedding and reranker heads are not")
    if ns.tuner_backend != "peft":
        raise bad("--tuner_backend", f"{ns.tuner_backend}: mvlm has its own LoRA/DoRA on "
                                     "Megatron layers (saved in PEFT's format): use peft")
    if ns.optimizer != "adam":
        raise bad("--optimizer", f"{ns.optimizer}: mvlm trains with Megatron-Core Adam "
                                 "(decoupled weight decay = AdamW): use adam")
    if ns.optim is not None:
        if ns.optim not in _ADAMW_NAMES:
            raise bad("--optim", f"{ns.optim}: the optimizer is Megatron-Core Adam(W); use "
                                 "adamw_torch (set --weight_decay/--adam_beta1/2/--adam_eps)")
        notes.append(f"--optim {ns.optim} -> Megatron-Core Adam with decoupled weight decay "
                     "(AdamW)")
    if ns.neftune_noise_alpha:
        raise bad("--neftune_noise_alpha", "NEFTune embedding noise is not implemented: "
                                           "drop the flag (or pass 0)")
    # Thinking flags change the encoding: a cache written by mvlm encode has neither applied.
    ns.ignore_empty_think = ns.loss_scale in _IGNORE_EMPTY_THINK
    for on, flag in ((ns.add_non_thinking_prefix, "--add_non_thinking_prefix true"),
                     (ns.ignore_empty_think, f"--loss_scale {ns.loss_scale}")):
        if on and ns.cached_dataset:
            raise bad(flag.split()[0], f"{flag} changes the encoding, but --cached_dataset was "
                      "encoded without it: train from --dataset instead")
    if getattr(ns, "_compat_finetune", None) is False:
        raise bad("--finetune", "false means resuming a Megatron-SWIFT run: mvlm resumes with "
                                "--resume CHECKPOINT_DIR (weights, optimizer, RNG, data position)")
    if getattr(ns, "use_dora", False) and ns.train_type in ("lora", "lora_llm"):
        notes.append(f"--use_dora true -> DoRA adapters (--train_type "
                     f"{'dora' if ns.train_type == 'lora' else 'lora_llm with DoRA'})")
        if ns.train_type == "lora":
            ns.train_type = "dora"
    # Loss mask: ms-swift's loss_scale -> which tokens carry loss (the data's task mode).
    if ns.loss_scale is not None:
        if ns.loss_scale not in _LOSS_SCALE_TASK:
            raise bad("--loss_scale", f"{ns.loss_scale}: mvlm trains every assistant turn "
                      "('default', or 'ignore_empty_think' without loss on empty think blocks) "
                      "or every text token ('all'); other strategies (last_round, agent "
                      "weights) are not implemented: keep only the turns to learn in the data")
        want = _LOSS_SCALE_TASK[ns.loss_scale]
        if want != task:
            notes.append(f"--loss_scale {ns.loss_scale} -> loss on "
                         f"{'every text token' if want == 'pt' else 'the assistant turns'} "
                         f"(the labels of mvlm {want})")
        ns.task = want
    if ns.add_non_thinking_prefix and ns.task not in ("sft", "preference"):
        raise bad("--add_non_thinking_prefix", f"true acts on chat-rendered assistant turns "
                  f"(sft, preference), not on task {ns.task}: drop the flag")
    if ns.strict is not None:
        ns.on_bad_sample = "error" if ns.strict else "skip"
        notes.append(f"--strict {str(ns.strict).lower()} -> --on_bad_sample {ns.on_bad_sample}")
    parse_columns(ns.columns)  # raises naming --columns
    kw = _json_arg("--lr_scheduler_kwargs", ns.lr_scheduler_kwargs)
    for k, v in kw.items():
        if k != "min_lr":
            raise bad("--lr_scheduler_kwargs", f"{k!r} is not supported (only min_lr -> "
                                               "--min_lr)")
        ns.min_lr = float(v)
        notes.append(f"--lr_scheduler_kwargs min_lr={v} -> --min_lr {v}")
    if ns.freeze_parameters_ratio not in (0.0, 1.0):
        raise bad("--freeze_parameters_ratio", f"{ns.freeze_parameters_ratio}: only 0 or 1 "
                  "(freeze everything, then --trainable_parameters); freeze layer ranges with "
                  "--freeze_parameters language_model.decoder.layers.0 ...")
    for flag in ("freeze_parameters_regex", "trainable_parameters_regex"):
        v = getattr(ns, flag)
        if v:
            try:
                re.compile(v)
            except re.error as e:
                raise bad(f"--{flag}", f"{v!r} is not a valid regex ({e})") from e
    if ns.moe_aux_loss_coeff is not None and ns.moe_aux_loss_coeff < 0:
        raise bad("--moe_aux_loss_coeff", "must be >= 0")
    save_strategy = ns.save_strategy
    if save_strategy == "epoch":
        notes.append("--save_strategy epoch -> a checkpoint and an evaluation at the step that "
                     "completes each epoch (--save_steps/--eval_steps are not used)")
        ns.save_interval = ns.eval_interval = None
    elif save_strategy == "no":
        notes.append("--save_strategy no -> no intermediate checkpoints (the final checkpoint "
                     "and HF export are still written)")
        ns.save_interval = None
    if os.environ.get("AUDIO_MAX_TOKEN_NUM"):
        notes.append("AUDIO_MAX_TOKEN_NUM is read into the media config but caps nothing: an "
                     "audio family's template cuts audio at its checkpoint's feature-extractor "
                     "window instead; it has no effect")
    if os.environ.get("SAMPLING_RATE"):
        notes.append("SAMPLING_RATE: audio is decoded at the checkpoint's feature-extractor "
                     "rate; an audio family's template refuses a SAMPLING_RATE that differs")


def _check_streaming_and_lazy(ns: argparse.Namespace, notes: list[str]) -> None:
    """--lazy_tokenize with --packing, and --streaming with --num_train_epochs (issue 9: the
    guide's 6.3 and 3.3 blocks).

    Packing plans rows from every sample's length, so with --packing the samples are encoded up
    front whatever --lazy_tokenize says: the flag then only trades memory for start-up time and
    does not change what is trained. A streamed dataset has no length; the epochs' step count is
    derived from the rows of local files, counted without encoding them. Where that count says
    nothing about the batches (hub datasets, columnar directories; packed rows, whose number
    depends on the encoded lengths) the epochs are refused."""
    if ns.lazy_tokenize and ns.packing:
        notes.append("--lazy_tokenize true with --packing: samples are encoded up front (as "
                     "--lazy_tokenize false), since packing needs every sample's length; this "
                     "changes memory use and start-up time, not what is trained")
        ns.lazy_tokenize = False
    if not ns.streaming or ns.cached_dataset:
        return
    if ns.save_strategy == "epoch":
        raise ValueError("--save_strategy epoch: a streamed dataset has no exact epoch "
                         "boundary (skipped rows shorten an epoch): use --save_steps, or drop "
                         "--streaming")
    if ns.train_iters is not None:
        return
    why = ""
    if ns.packing:
        why = ("with --packing the stream's rows become packed rows whose number depends on "
               "the encoded lengths")
    else:
        from mvlm.data.textrows import count_rows

        n_rows, uncountable = 0, None
        for spec in ns.dataset or []:
            n = count_rows(spec)
            if n is None:
                uncountable = spec
                break
            n_rows += n
        if uncountable is not None:
            why = (f"the rows of {uncountable!r} cannot be counted cheaply (it is not an "
                   "existing local .jsonl/.json/.csv/.parquet file: hub IDs, :SUBSET specs "
                   "and directories are not counted)")
    if why:
        raise ValueError(f"--streaming: --num_train_epochs needs the number of steps per epoch, "
                         f"and {why}: pass --max_steps/--train_iters (ms-swift requires "
                         "max_steps with streaming too)")
    epochs = ns.num_train_epochs if ns.num_train_epochs is not None else 1.0
    notes.append(f"--streaming with --num_train_epochs {epochs:g}: steps = ceil({epochs:g} x "
                 f"{n_rows} rows / global batch size); {n_rows} counts the files' rows, not "
                 "encodable samples, so skipped bad rows make an epoch shorter and the stream "
                 "then continues into the next epoch")


def _model_from_run_dir(path: str, notes: list[str]) -> str:
    """``--model OUTPUT_DIR`` of an earlier mvlm run (the guide's stage-2 script starts from
    stage 1's --output_dir): the run's HF export (``<dir>/hf``, written at the end of training)
    is the model it trained. A run dir without one (stopped early, or an adapter run) is
    refused with what to pass instead, rather than failing later on a missing config.json."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return path
    hf = os.path.join(path, "hf")
    if os.path.exists(os.path.join(hf, "config.json")):
        notes.append(f"--model {path} is an mvlm training run -> its HF export {hf}")
        return hf
    if os.path.exists(os.path.join(path, "latest")):
        what = ("an adapter run: pass its base as --model and the adapters with --adapters "
                f"{os.path.join(path, 'adapter')}, or merge them first (mvlm export --model "
                f"{path} --merge_lora true --output DIR)"
                if os.path.isdir(os.path.join(path, "adapter")) else
                "a run without an HF export (stopped early?): pass its checkpoint with "
                f"--mcore_model {path}/checkpoint-N, or finish the run")
        raise ValueError(f"--model {path}: is {what}")
    return path


def _validate(ns: argparse.Namespace, task: str, notes: list[str]) -> TrainConfig:
    def bad(flag: str, msg: str) -> ValueError:
        return ValueError(f"{flag}: {msg}")

    from mvlm.tuners.train_hooks import adapter_config, check_tuner_flags  # light at import

    _early_swift(ns, notes)
    # adapter flags first (as passed; --use_dora's train-type mapping follows in _validate_swift)
    check_tuner_flags(_tuner(ns), ns.torch_dtype)
    adapter_config(_tuner(ns), freeze_vit=ns.freeze_vit is not False, seed=ns.seed)
    if not ns.model and not ns.mcore_model:
        raise bad("--model", "pass an HF checkpoint dir (--model) or an mvlm torch_dist "
                             "checkpoint (--mcore_model / --load)")
    if ns.model and ns.mcore_model:
        raise bad("--mcore_model", "give either --model (HF dir) or --mcore_model, not both")
    if ns.model and os.path.exists(os.path.join(ns.model, "mvlm_meta.json")):
        notes.append(f"--model {ns.model} is an mvlm Megatron checkpoint -> --mcore_model")
        ns.mcore_model, ns.model = ns.model, None
    if ns.model:
        ns.model = _model_from_run_dir(ns.model, notes)
    for flag in ("model", "mcore_model"):
        v = getattr(ns, flag)
        if v and not os.path.isdir(v):
            raise bad(f"--{flag}", f"{v} is not a directory")
    if ns.load_safetensors is not None:
        notes.append("--load_safetensors: --model is always read as HF safetensors")
    if not ns.dataset and not ns.cached_dataset:
        raise bad("--dataset", "no training data: pass --dataset FILE... or --cached_dataset DIR")
    if not ns.output_dir:
        raise bad("--output_dir", "where checkpoints, logs and the HF export go (or --save DIR)")

    # Batch sizes.
    mbs = ns.micro_batch_size
    if ns.per_device_train_batch_size is not None:
        if mbs is not None and mbs != ns.per_device_train_batch_size:
            raise bad("--per_device_train_batch_size",
                      f"{ns.per_device_train_batch_size} contradicts --micro_batch_size {mbs}")
        mbs = ns.per_device_train_batch_size
        notes.append(f"--per_device_train_batch_size {mbs} -> --micro_batch_size {mbs}")
    mbs = mbs or 1
    if mbs < 1:
        raise bad("--micro_batch_size", "must be >= 1")
    # With --packing a micro-batch of N holds N packed rows (ms-swift's meaning); the collator
    # concatenates them padding-free into one row with per-sample boundaries (cu_seqlens), so
    # the global batch stays micro x DP x num_microbatches packed rows.
    if ns.padding_free:
        if not ns.packing:
            notes.append("--padding_free -> --packing (padding-free packed rows)")
        ns.packing = True
    if ns.packing and not ns.max_length:
        raise bad("--packing", "needs --max_length (the packed row length)")
    _check_streaming_and_lazy(ns, notes)  # [issue 9] guide 3.3 / 6.3

    # Iterations.
    if ns.train_iters is None and ns.num_train_epochs is None:
        ns.num_train_epochs = 1.0 if ns.dataset or ns.cached_dataset else None
    if ns.train_iters is not None and ns.train_iters < 1:
        raise bad("--train_iters", "must be >= 1")
    if ns.num_train_epochs is not None and ns.num_train_epochs <= 0:
        raise bad("--num_train_epochs", "must be > 0")

    # Learning rate and schedule.
    lr = ns.lr
    if lr is None:  # ms-swift's defaults: 1e-5 full, 1e-4 with adapters
        lr = 1e-5 if ns.train_type == "full" else 1e-4
        notes.append(f"--lr not given -> {lr:g} (ms-swift's default for --train_type "
                     f"{ns.train_type})")
    style = _DECAY.get(ns.lr_decay_style)
    if style is None:
        raise bad("--lr_decay_style", f"{ns.lr_decay_style!r} is not supported: use cosine, "
                                      "linear or constant")
    if style != ns.lr_decay_style:
        notes.append(f"--lr_scheduler_type {ns.lr_decay_style} -> --lr_decay_style {style}")
    if ns.min_lr < 0 or ns.min_lr > lr:
        raise bad("--min_lr", f"{ns.min_lr} must be in [0, --lr {lr}]")
    if ns.lr_warmup_fraction is not None and not 0 <= ns.lr_warmup_fraction < 1:
        raise bad("--lr_warmup_fraction", f"{ns.lr_warmup_fraction} must be in [0, 1)")
    if ns.lr_warmup_fraction and ns.lr_warmup_iters:
        raise bad("--lr_warmup_iters", "give either --lr_warmup_fraction/--warmup_ratio or "
                                       "--lr_warmup_iters/--warmup_steps")
    if ns.clip_grad < 0:
        raise bad("--clip_grad", "must be >= 0 (0 disables clipping)")

    # Optimizer sharding: Megatron flag, or the DeepSpeed ZeRO stage users had.
    dist_opt = ns.use_distributed_optimizer
    if ns.deepspeed is not None:
        stage = os.path.basename(str(ns.deepspeed)).lower().replace(".json", "")
        if stage.startswith("zero") and stage[4:5] in ("0", "1", "2", "3") and \
                stage[5:] in ("", "_offload"):
            want = stage[4] != "0"
            notes.append(f"--deepspeed {ns.deepspeed} -> --use_distributed_optimizer "
                         f"{str(want).lower()} (Megatron shards optimizer state over DP; weights "
                         "are split by TP/PP instead of ZeRO-3)")
            if stage.endswith("_offload"):
                notes.append(f"--deepspeed {ns.deepspeed}: the CPU OFFLOAD part is NOT applied "
                             "- optimizer state and weights stay on the accelerator (sharded "
                             "over DP); if memory is short add DP ranks, --tp/--pp, or "
                             "--train_type lora")
            if dist_opt is None:
                dist_opt = want
        else:
            raise bad("--deepspeed", f"{ns.deepspeed!r}: use zero0|zero1|zero2|zero3 (or "
                                     "zero2_offload|zero3_offload, offload not applied), or "
                                     "--use_distributed_optimizer true")
    if dist_opt is None:
        dist_opt = True  # Megatron-SWIFT's default
    # Recompute: HF gradient_checkpointing -> full recompute.
    recompute = None if ns.recompute_granularity in (None, "none") else ns.recompute_granularity
    if ns.gradient_checkpointing and recompute is None:
        recompute = "full"
        notes.append("--gradient_checkpointing true -> --recompute_granularity full")
    elif ns.gradient_checkpointing is not None and not ns.gradient_checkpointing:
        notes.append("--gradient_checkpointing false -> no activation recompute")
    recompute_modules = getattr(ns, "recompute_modules", None)  # ms-swift flag (args owner)
    try:  # flag combinations; the layer-count checks run once the model is known
        RecomputeConfig(recompute, ns.recompute_method, ns.recompute_num_layers,
                        recompute_modules).check_flags()
    except RecomputeError as e:
        raise ValueError(str(e)) from None
    if ns.max_skipped_steps < 0:
        raise bad("--max_skipped_steps", "must be >= 0")
    if ns.max_skipped_steps and not ns.check_for_nan_in_loss_and_grad:
        raise bad("--max_skipped_steps", "skipping needs the check: drop it or set "
                                         "--check_for_nan_in_loss_and_grad true")

    # dtype: --bf16/--fp16 (Megatron/HF switches) map onto --torch_dtype.
    dtype = ns.torch_dtype
    if getattr(ns, "_compat_bf16", None):
        dtype = dtype or "bfloat16"
    if getattr(ns, "_compat_fp16", None):
        dtype = dtype or "float16"
    if dtype == "float16":
        raise bad("--torch_dtype", "float16 training needs loss scaling, which mvlm does not do "
                                   "yet: use bfloat16 (or float32)")

    # Parallel sizes.
    for name in ("tp", "pp", "cp", "ep"):
        if getattr(ns, name) < 1:
            raise bad(f"--{name}", "must be >= 1")
    if ns.sequence_parallel and ns.tp == 1:
        notes.append("--sequence_parallel ignored at TP=1")
        ns.sequence_parallel = False
    if ns.vpp is not None and ns.vpp > 1 and ns.pp == 1:
        raise bad("--virtual_pipeline_model_parallel_size", "needs --pp > 1")
    if ns.vpp == 1:
        ns.vpp = None

    # Freezing: ms-swift's defaults -- the ViT and the aligner are frozen (freeze_vit and
    # freeze_aligner default to true) except with lora_llm, which trains both in full. ns keeps
    # what the user passed (None = not given): the trainer only objects to explicit flags on a
    # text-only model, and the adapter code reads an explicit --freeze_vit false.
    default_frozen = ns.train_type != "lora_llm"
    freeze_vit = bool(ns.freeze_vit) if ns.freeze_vit is not None else default_frozen
    freeze_aligner = bool(ns.freeze_aligner) if ns.freeze_aligner is not None \
        else default_frozen
    if freeze_vit and ns.vit_lr is not None:
        raise bad("--vit_lr", "the ViT is frozen (--freeze_vit true" +
                  (", ms-swift's default" if ns.freeze_vit is None else "") +
                  "): drop --vit_lr or pass --freeze_vit false")
    if freeze_aligner and ns.aligner_lr is not None:
        raise bad("--aligner_lr", "the aligner is frozen (--freeze_aligner true" +
                  (", ms-swift's default" if ns.freeze_aligner is None else "") +
                  "): drop --aligner_lr or pass --freeze_aligner false")
    if freeze_vit and freeze_aligner and ns.freeze_llm:
        raise bad("--freeze_llm", "every part is frozen: nothing would train")

    attn = _ATTN.get(ns.attn_impl)
    if attn is None:
        raise bad("--attn_impl", f"{ns.attn_impl!r}: use one of "
                                 f"{', '.join(k for k in _ATTN if k)}")
    if ns.attn_impl == "local":  # Megatron's --attention_backend local = the local spec
        if ns.transformer_impl == "te":
            raise bad("--attn_impl", "local means the local (non-TE) spec: drop "
                                     "--transformer_impl te or pick flash/fused/unfused")
        if ns.transformer_impl != "local":
            notes.append("--attn_impl local -> --transformer_impl local, eager core attention")
        ns.transformer_impl = "local"
    if attn != "auto" and ns.attn_impl not in ("local",):
        notes.append(f"--attn_impl {ns.attn_impl} -> core attention kernel {attn}")

    # Intervals.
    for flag in ("eval_interval", "save_interval", "log_interval", "exit_interval",
                 "save_total_limit", "eval_iters"):
        v = getattr(ns, flag)
        if v is not None and v < 1:
            raise bad(f"--{flag}", "must be >= 1")
    report = [r.lower() for r in ns.report_to]
    if "none" in report:
        report = []
    for r in report:
        if r not in ("tensorboard", "wandb", "all"):
            raise bad("--report_to", f"{r!r}: use tensorboard, wandb or none")
    if "all" in report:
        report = ["tensorboard", "wandb"]
    resume = ns.resume_from_checkpoint or ns.resume
    if ns.resume_from_checkpoint:
        notes.append(f"--resume_from_checkpoint -> --resume {resume}")
    if ns.save_only_model or ns.no_save_optim:
        notes.append("--save_only_model: checkpoints hold weights only (no exact resume)")
    if ns.max_length is not None and ns.max_length < 2:
        raise bad("--max_length", "must be >= 2")
    if ns.task != task:
        ns.task = task
    if task == "pt":
        ns.task = "pt"
    _validate_swift(ns, task, notes)

    return TrainConfig(
        task=task, output_dir=ns.output_dir, seed=ns.seed, notes=notes,
        base=ModelConfig(model=ns.model, mcore_model=ns.mcore_model, torch_dtype=dtype,
                         attn_impl=attn, transformer_impl=ns.transformer_impl, device=ns.device,
                         moe_aux_loss_coeff=ns.moe_aux_loss_coeff),
        parallel=ParallelConfig(
            tp=ns.tp, pp=ns.pp, cp=ns.cp, ep=ns.ep, etp=ns.etp, vpp=ns.vpp,
            sequence_parallel=bool(ns.sequence_parallel),
            use_distributed_optimizer=bool(dist_opt),
            overlap_grad_reduce=bool(ns.overlap_grad_reduce), recompute_granularity=recompute,
            recompute_method=ns.recompute_method, recompute_num_layers=ns.recompute_num_layers,
            recompute_modules=recompute_modules),
        schedule=ScheduleConfig(
            micro_batch_size=mbs, global_batch_size=ns.global_batch_size,
            gradient_accumulation_steps=ns.gradient_accumulation_steps,
            train_iters=ns.train_iters, num_train_epochs=ns.num_train_epochs),
        optim=OptimConfig(
            lr=lr, min_lr=ns.min_lr, lr_decay_style=style,
            lr_warmup_fraction=ns.lr_warmup_fraction, lr_warmup_iters=ns.lr_warmup_iters or 0,
            weight_decay=ns.weight_decay, adam_beta1=ns.adam_beta1, adam_beta2=ns.adam_beta2,
            adam_eps=ns.adam_eps, clip_grad=ns.clip_grad, vit_lr=ns.vit_lr,
            aligner_lr=ns.aligner_lr,
            check_for_nan_in_loss_and_grad=bool(ns.check_for_nan_in_loss_and_grad),
            max_skipped_steps=ns.max_skipped_steps),
        freeze=FreezeConfig(
            freeze_vit=freeze_vit, freeze_aligner=freeze_aligner, freeze_llm=bool(ns.freeze_llm),
            freeze_vit_flag=ns.freeze_vit, freeze_aligner_flag=ns.freeze_aligner,
            freeze_parameters=list(ns.freeze_parameters or []),
            freeze_parameters_regex=ns.freeze_parameters_regex,
            freeze_all=ns.freeze_parameters_ratio == 1.0,
            trainable_parameters=list(ns.trainable_parameters or []),
            trainable_parameters_regex=ns.trainable_parameters_regex),
        tuner=_tuner(ns),
        data=DataConfig.from_flags(vars(ns)),
        eval=EvalConfig(eval_interval=ns.eval_interval, eval_iters=ns.eval_iters),
        ckpt=CheckpointConfig(
            save_interval=ns.save_interval, save_total_limit=ns.save_total_limit,
            save_strategy=ns.save_strategy,
            save_optim=not (ns.save_only_model or ns.no_save_optim),
            save_final_checkpoint=bool(ns.save_final_checkpoint),
            save_safetensors=bool(ns.save_safetensors), resume=str(resume),
            exit_interval=ns.exit_interval),
        log=LoggingConfig(
            log_interval=ns.log_interval, report_to=report, logging_dir=ns.logging_dir,
            wandb_project=ns.wandb_project, wandb_exp_name=ns.wandb_exp_name,
            disable_tqdm=bool(ns.disable_tqdm)))


def _tuner(ns: argparse.Namespace) -> TunerConfig:
    return TunerConfig(
        train_type=ns.train_type, lora_rank=ns.lora_rank, lora_alpha=ns.lora_alpha,
        lora_dropout=ns.lora_dropout, use_rslora=bool(ns.use_rslora),
        target_modules=list(ns.target_modules), target_regex=ns.target_regex,
        modules_to_save=list(ns.modules_to_save or []), adapters=ns.adapters,
        merge_lora=bool(ns.merge_lora), use_dora=bool(ns.use_dora), lora_bias=ns.lora_bias,
        lora_dtype=ns.lora_dtype)


def apply_hf_overrides(cfg: TrainConfig, hf_config: Any) -> None:
    """Flags that override values mvlm otherwise reads from the checkpoint's config.json (the
    in-memory config the model is built from; the exported config.json stays the original):
    --moe_aux_loss_coeff -> ``router_aux_loss_coef`` (the families' MoE arch reads it; > 0 turns
    Megatron's aux-loss load balancing on)."""
    coeff = cfg.base.moe_aux_loss_coeff
    if coeff is None:
        return
    for c in (hf_config, getattr(hf_config, "text_config", None)):
        if c is not None:
            c.router_aux_loss_coef = coeff


def epoch_end_steps(n_items: int, global_batch_size: int, train_iters: int) -> set[int]:
    """--save_strategy epoch: the steps whose global batch holds the last item of an epoch
    (step ceil(k * n / gbs) for epoch k), up to ``train_iters``."""
    out = set()
    k = 1
    while True:
        s = math.ceil(k * n_items / global_batch_size)
        if s > train_iters:
            return out
        out.add(s)
        k += 1


def iterations_for_epochs(epochs: float, n_items: int, global_batch_size: int) -> int:
    """Steps that cover ``epochs`` passes over ``n_items`` (at least one step)."""
    return max(1, math.ceil(epochs * n_items / global_batch_size))


# ----------------------------------------------------------------------------- docs/ms-swift.md

FLAG_DOC = "docs/ms-swift.md"
_DOC_HEAD = """# ms-swift flags in mvlm

Every flag `mvlm pt` / `mvlm sft` knows, and what it does there. ms-swift (`swift sft/pt`) and
Megatron-SWIFT (`megatron sft/pt`) scripts run with the command name changed; each alias, mapping
and ignored flag prints one info line at start-up, refused flags stop before anything starts.

Kinds: **native** (mvlm implements the flag under this name), **alias** (another spelling of a
native flag), **mapped** (sets another flag's value), **ignored** (accepted; it cannot change
what is trained, the reason says why), **refused** (stops with the reason and the alternative),
**refused value** (the flag works, that value does not).

Defaults follow ms-swift: `--freeze_vit`/`--freeze_aligner` true (false with `--train_type
lora_llm`), `--lr` 1e-5 for full training and 1e-4 with adapters. Hub IDs in `--model` and
`--dataset` (`ORG/NAME[:SUBSET][#N]`) are resolved by `mvlm.hub`: the local Hugging Face cache
first (also with `HF_HUB_OFFLINE=1`), then ModelScope (`--use_hf false`, ms-swift's default, when
the `modelscope` package is installed) or Hugging Face.

This file is generated from the tables in `mvlm/train/args.py` (`write_flag_doc()`);
`tests/unit/test_ms_swift_flags.py` fails when it is out of date.

| flag | kind | mvlm behaviour |
|---|---|---|
"""


def flag_table(task: str = "sft") -> list[tuple[str, str, str]]:
    """(flag, kind, behaviour) for every option of the `mvlm pt|sft` parser plus the refused
    values, sorted by flag: the content of docs/ms-swift.md."""
    p = build_parser(task)
    rows: dict[str, tuple[str, str, str]] = {}
    for a in p._actions:
        for opt in a.option_strings:
            if not opt.startswith("--") or opt == "--help":
                continue
            if opt in IGNORED:
                rows[opt] = (opt, "ignored", IGNORED[opt])
            elif opt in MAPPED:
                rows[opt] = (opt, "mapped", "-> " + MAPPED[opt])
            elif opt in REFUSED:
                rows[opt] = (opt, "refused", REFUSED[opt])
            elif SAME_MEANING.get(opt, opt) != opt:
                canon = SAME_MEANING[opt]
                rows[opt] = (opt, "alias", f"= {canon} ({ALIAS_WHY.get(opt, 'same meaning')})")
            elif opt != a.option_strings[0]:
                rows[opt] = (opt, "alias", f"= {a.option_strings[0]} (same meaning)")
            else:
                what = " ".join((a.help or "").split()) or "as in ms-swift / Megatron-SWIFT"
                if a.default not in (None, argparse.SUPPRESS) and not opt.startswith("--_"):
                    what += f" (default: {a.default})"
                rows[opt] = (opt, "native", what)
    for (flag, value), why in REFUSED_VALUES.items():
        rows[f"{flag} {value}"] = (f"{flag} {value}", "refused value", why)
    return [rows[k] for k in sorted(rows)]


def render_flag_doc(task: str = "sft") -> str:
    def cell(t: str) -> str:  # a table cell: no column breaks, no HTML tags
        return t.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")

    return _DOC_HEAD + "".join(f"| `{f}` | {k} | {cell(b)} |\n" for f, k, b in flag_table(task))


def write_flag_doc(repo_root: str = ".") -> str:
    """Regenerate docs/ms-swift.md (atomically); returns its path."""
    path = os.path.join(repo_root, FLAG_DOC)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render_flag_doc())
    os.replace(tmp, path)
    return path
