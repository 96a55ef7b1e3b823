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
and the fix: a wrong flag must never cost a cluster allocation.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from mvlm.data.flags import str2bool  # one parser for data and train flags (light module)
from mvlm.models.recompute import RecomputeConfig, RecomputeError  # light: stdlib only

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
}

# Accepted and ignored, with the reason (they describe things mvlm decides for itself).
IGNORED: dict[str, str] = {
    "--model_type": "the family is read from the checkpoint's config.json",
    "--template": "the chat template comes from the checkpoint's tokenizer/processor",
    "--use_hf": "nothing is downloaded; --model is a local directory",
    "--model_author": "only used by ms-swift's self-cognition data",
    "--model_name": "only used by ms-swift's self-cognition data",
    "--per_device_eval_batch_size": "eval uses --micro_batch_size",
    "--eval_strategy": "evaluation runs every --eval_interval steps",
    "--evaluation_strategy": "evaluation runs every --eval_interval steps",
    "--save_strategy": "checkpoints are written every --save_interval steps",
    "--logging_strategy": "logging happens every --log_interval steps",
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
    "--bf16": "handled through --torch_dtype",
    "--fp16": "handled through --torch_dtype",
    "--finetune": "a fresh --model/--mcore_model always starts at step 0 (resume uses --resume)",
    "--no_load_optim": "--mcore_model loads weights only; --resume restores the optimizer",
    "--no_load_rng": "--mcore_model loads weights only",
}

# Cannot apply: refused with the mvlm equivalent.
REFUSED: dict[str, str] = {
    "--fsdp": "use --use_distributed_optimizer true (ZeRO-style sharding of optimizer state)",
    "--fsdp_config": "use --use_distributed_optimizer true",
    "--deepspeed_config": "use --use_distributed_optimizer true",
    "--torch_compile": "not supported yet; remove the flag",
    "--use_liger_kernel": "not used by the Megatron path; remove the flag",
    "--optim": "the optimizer is Megatron-Core Adam(W); set --weight_decay/--adam_beta1/2",
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
                        "matmul-softmax), auto (default: flash-attn where it runs, else SDPA). "
                        "Megatron names: flash, fused (=sdpa), unfused (=eager), local (=eager "
                        "on the local spec). The TE spec maps them onto its attention backend.")
    g.add_argument("--transformer_impl", default="auto", choices=["auto", "te", "local"])
    g.add_argument("--device", default=None, choices=["cpu", "cuda"])

    g = p.add_argument_group("schedule")
    g.add_argument("--num_train_epochs", type=float, default=None)
    g.add_argument("--train_iters", type=int, default=None)
    g.add_argument("--micro_batch_size", type=int, default=None)
    g.add_argument("--per_device_train_batch_size", type=int, default=None)
    g.add_argument("--global_batch_size", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
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
    _bool(g, "--freeze_vit", default=None)
    _bool(g, "--freeze_aligner", default=None)
    _bool(g, "--freeze_llm", default=False)
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

    # Accepted-and-ignored / refused flags get their own entries so argparse knows them.
    g = p.add_argument_group("compatibility (accepted for ms-swift scripts)")
    for flag in list(IGNORED) + list(REFUSED):
        if flag in ("--bf16", "--fp16", "--finetune", "--no_load_optim", "--no_load_rng",
                    "--no_save_rng", "--use_hf", "--cross_entropy_loss_fusion",
                    "--moe_grouped_gemm", "--moe_shared_expert_overlap", "--moe_permute_fusion",
                    "--overlap_param_gather", "--dataloader_drop_last", "--torch_compile",
                    "--use_liger_kernel", "--remove_unused_columns"):
            _bool(g, flag, default=None, dest="_compat_" + flag[2:])
        else:
            g.add_argument(flag, default=None, dest="_compat_" + flag[2:], nargs="?", const="1")
    for alias, canon in SAME_MEANING.items():
        if alias == canon:
            continue
        action = p._option_string_actions[canon]
        p._option_string_actions[alias] = action
        action.option_strings.append(alias)

    from mvlm.data.encode import add_data_args

    add_data_args(p)


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


@dataclass
class TrainConfig:
    """Validated training configuration (what the loop reads). ``ns`` keeps every flag (data
    flags included) for the data pipeline, which reads them by name."""

    task: str
    model: str | None
    mcore_model: str | None
    output_dir: str
    torch_dtype: str | None
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int | None
    vpp: int | None
    sequence_parallel: bool
    use_distributed_optimizer: bool
    overlap_grad_reduce: bool
    recompute_granularity: str | None
    micro_batch_size: int
    global_batch_size: int | None
    gradient_accumulation_steps: int | None
    train_iters: int | None
    num_train_epochs: float | None
    lr: float
    min_lr: float
    lr_decay_style: str
    lr_warmup_fraction: float | None
    lr_warmup_iters: int
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    vit_lr: float | None
    aligner_lr: float | None
    freeze_vit: bool
    freeze_aligner: bool
    freeze_llm: bool
    eval_interval: int | None
    eval_iters: int | None
    save_interval: int | None
    save_total_limit: int | None
    save_safetensors: bool
    save_optim: bool
    resume: str
    exit_interval: int | None
    log_interval: int
    report_to: list[str]
    wandb_project: str
    wandb_exp_name: str | None
    attn_impl: str | None
    transformer_impl: str
    device: str | None
    packing: bool
    dataloader_num_workers: int
    seed: int
    max_skipped_steps: int
    disable_tqdm: bool
    ns: argparse.Namespace = field(repr=False, default_factory=argparse.Namespace)
    notes: list[str] = field(default_factory=list)
    # Activation recompute beyond the granularity (mvlm.models.recompute.RecomputeConfig).
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    # Megatron's selective-recompute submodules (core_attn, mlp, layernorm, moe,
    # shared_experts; None = Megatron's default ["core_attn"]). Filled from ms-swift's
    # --recompute_modules: set it ONLY when the user passed the flag (a value with no
    # --recompute_granularity selective is refused as having no effect).
    recompute_modules: list[str] | None = None
    check_for_nan_in_loss_and_grad: bool = True

    @property
    def recompute(self) -> RecomputeConfig:
        """The recompute flags as one value (checked against the model in transformer_config)."""
        return RecomputeConfig(self.recompute_granularity, self.recompute_method,
                               self.recompute_num_layers, self.recompute_modules)

    def dp_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def resolve_batch(self, world_size: int) -> None:
        """Fill global_batch_size from --gradient_accumulation_steps once the DP size is known,
        and check divisibility (global = micro * DP * micro-batches per step)."""
        dp = self.dp_size(world_size)
        per_step = self.micro_batch_size * dp
        if self.global_batch_size is None:
            gas = self.gradient_accumulation_steps or 1
            self.global_batch_size = per_step * gas
            if self.gradient_accumulation_steps:
                self.notes.append(
                    f"--gradient_accumulation_steps {gas} -> --global_batch_size "
                    f"{self.global_batch_size} (= micro {self.micro_batch_size} x DP {dp} x {gas})")
        elif self.gradient_accumulation_steps and \
                self.global_batch_size != per_step * self.gradient_accumulation_steps:
            raise ValueError(
                f"--global_batch_size {self.global_batch_size} contradicts "
                f"--gradient_accumulation_steps {self.gradient_accumulation_steps} (micro "
                f"{self.micro_batch_size} x DP {dp} x {self.gradient_accumulation_steps} = "
                f"{per_step * self.gradient_accumulation_steps}): pass only one of them")
        if self.global_batch_size % per_step:
            raise ValueError(
                f"--global_batch_size {self.global_batch_size} is not a multiple of "
                f"--micro_batch_size {self.micro_batch_size} x data-parallel size {dp} = "
                f"{per_step}: choose a global batch size of k*{per_step}")

    @property
    def layout_kwargs(self) -> dict[str, Any]:
        return {"tp": self.tp, "pp": self.pp, "cp": self.cp, "ep": self.ep, "etp": self.etp,
                "vpp": self.vpp}


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
            notes.append(f"{flag} -> {SAME_MEANING[flag]} (same meaning)")
        if flag in IGNORED:
            notes.append(f"{flag} ignored: {IGNORED[flag]}")
    ns = build_parser(task).parse_args(argv)
    ns.task = task
    return _validate(ns, task, notes)


def _validate(ns: argparse.Namespace, task: str, notes: list[str]) -> TrainConfig:
    def bad(flag: str, msg: str) -> ValueError:
        return ValueError(f"{flag}: {msg}")

    from mvlm.tuners.train_hooks import adapter_config_from_args  # mvlm.tuners (validation)

    adapter_config_from_args(ns)
    if not ns.model and not ns.mcore_model:
        raise bad("--model", "pass an HF checkpoint dir (--model) or an mvlm torch_dist "
                             "checkpoint (--mcore_model / --load)")
    if ns.model and ns.mcore_model:
        raise bad("--mcore_model", "give either --model (HF dir) or --mcore_model, not both")
    if ns.model and os.path.exists(os.path.join(ns.model, "mvlm_meta.json")):
        notes.append(f"--model {ns.model} is an mvlm Megatron checkpoint -> --mcore_model")
        ns.mcore_model, ns.model = ns.model, None
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

    # Iterations.
    if ns.train_iters is None and ns.num_train_epochs is None:
        ns.num_train_epochs = 1.0 if ns.dataset or ns.cached_dataset else None
    if ns.train_iters is not None and ns.train_iters < 1:
        raise bad("--train_iters", "must be >= 1")
    if ns.num_train_epochs is not None and ns.num_train_epochs <= 0:
        raise bad("--num_train_epochs", "must be > 0")

    # Learning rate and schedule.
    lr = ns.lr if ns.lr is not None else 1e-5
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
        if stage.startswith("zero") and stage[4:5] in ("0", "1", "2", "3"):
            want = stage[4] != "0"
            notes.append(f"--deepspeed {ns.deepspeed} -> --use_distributed_optimizer "
                         f"{str(want).lower()} (Megatron shards optimizer state over DP; weights "
                         "are split by TP/PP instead of ZeRO-3)")
            if dist_opt is None:
                dist_opt = want
        else:
            raise bad("--deepspeed", f"{ns.deepspeed!r}: use zero0|zero1|zero2|zero3, or "
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

    # Freezing: ms-swift defaults (full SFT trains the LLM and aligner, freezes nothing).
    freeze_vit = bool(ns.freeze_vit) if ns.freeze_vit is not None else False
    freeze_aligner = bool(ns.freeze_aligner) if ns.freeze_aligner is not None else False
    if freeze_vit and ns.vit_lr is not None:
        raise bad("--vit_lr", "the ViT is frozen (--freeze_vit true): drop --vit_lr or unfreeze")
    if freeze_aligner and ns.aligner_lr is not None:
        raise bad("--aligner_lr", "the aligner is frozen (--freeze_aligner true)")
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

    return TrainConfig(
        task=task, model=ns.model, mcore_model=ns.mcore_model, output_dir=ns.output_dir,
        torch_dtype=dtype, tp=ns.tp, pp=ns.pp, cp=ns.cp, ep=ns.ep, etp=ns.etp, vpp=ns.vpp,
        sequence_parallel=bool(ns.sequence_parallel), use_distributed_optimizer=bool(dist_opt),
        overlap_grad_reduce=bool(ns.overlap_grad_reduce), recompute_granularity=recompute,
        micro_batch_size=mbs, global_batch_size=ns.global_batch_size,
        gradient_accumulation_steps=ns.gradient_accumulation_steps,
        train_iters=ns.train_iters, num_train_epochs=ns.num_train_epochs, lr=lr,
        min_lr=ns.min_lr, lr_decay_style=style, lr_warmup_fraction=ns.lr_warmup_fraction,
        lr_warmup_iters=ns.lr_warmup_iters or 0, weight_decay=ns.weight_decay,
        adam_beta1=ns.adam_beta1, adam_beta2=ns.adam_beta2, adam_eps=ns.adam_eps,
        clip_grad=ns.clip_grad, vit_lr=ns.vit_lr, aligner_lr=ns.aligner_lr,
        freeze_vit=freeze_vit, freeze_aligner=freeze_aligner, freeze_llm=bool(ns.freeze_llm),
        eval_interval=ns.eval_interval, eval_iters=ns.eval_iters,
        save_interval=ns.save_interval, save_total_limit=ns.save_total_limit,
        save_safetensors=bool(ns.save_safetensors),
        save_optim=not (ns.save_only_model or ns.no_save_optim), resume=str(resume),
        exit_interval=ns.exit_interval, log_interval=ns.log_interval, report_to=report,
        wandb_project=ns.wandb_project, wandb_exp_name=ns.wandb_exp_name, attn_impl=attn,
        transformer_impl=ns.transformer_impl, device=ns.device, packing=bool(ns.packing),
        dataloader_num_workers=ns.dataloader_num_workers, seed=ns.seed,
        max_skipped_steps=ns.max_skipped_steps, disable_tqdm=bool(ns.disable_tqdm), ns=ns,
        notes=notes, recompute_method=ns.recompute_method,
        recompute_num_layers=ns.recompute_num_layers, recompute_modules=recompute_modules,
        check_for_nan_in_loss_and_grad=bool(ns.check_for_nan_in_loss_and_grad))


def iterations_for_epochs(epochs: float, n_items: int, global_batch_size: int) -> int:
    """Steps that cover ``epochs`` passes over ``n_items`` (at least one step)."""
    return max(1, math.ceil(epochs * n_items / global_batch_size))
