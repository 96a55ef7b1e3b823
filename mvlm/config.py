"""The typed training configuration: one nested dataclass, built once from flags/YAML.

Why nested and typed: the trainer, the data pipeline and the adapter code each read their own
section (``cfg.data``, ``cfg.tuner``, ``cfg.optim`` ...) instead of fishing names out of a flat
bag of ~60 fields or the raw argparse namespace. The CLI layer (:mod:`mvlm.train.args` for
``mvlm pt|sft``, :mod:`mvlm.cli` for ``mvlm encode``) parses the ms-swift / HF-Trainer /
Megatron spellings, validates them and builds a :class:`TrainConfig`; nothing after it sees an
``argparse.Namespace``. Field names are the canonical flag names (``cfg.optim.lr`` is ``--lr``),
so a flag and the field it sets are found by the same grep.

Sections: ``base`` (the model: checkpoint, dtype, kernels), ``parallel`` (TP/PP/CP/EP/VPP,
sequence parallelism, optimizer sharding, recompute), ``schedule`` (batch sizes and how long),
``optim`` (LR schedule, Adam, clipping, NaN guard), ``freeze`` (which parameters train),
``tuner`` (LoRA/DoRA), ``data`` (datasets, template, packing, media), ``eval``, ``ckpt``,
``log``. Preference/RL settings become one more section (``rl``) when those objectives land.

This module imports the standard library (and the stdlib-only recompute settings) only: the
``--help`` screens and the flag validation must not import torch (tests/unit/test_cli_help.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mvlm.models.recompute import RecomputeConfig


@dataclass
class ModelConfig:
    """The base model: where its weights come from and how its modules are built."""

    model: str | None = None  # HF checkpoint dir
    mcore_model: str | None = None  # mvlm torch_dist checkpoint dir
    torch_dtype: str | None = None  # None: the checkpoint's dtype
    attn_impl: str = "auto"  # mvlm kernel name (mvlm.models.gpt.ATTN_IMPLS)
    transformer_impl: str = "auto"  # auto | te | local
    device: str | None = None  # cpu | cuda | None (what the launch has)
    # --moe_aux_loss_coeff: overrides the checkpoint's router_aux_loss_coef (None: keep it)
    moe_aux_loss_coeff: float | None = None


@dataclass
class ParallelConfig:
    """How the model and its optimizer are split over the ranks (Megatron-Core names)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True  # Megatron-SWIFT's default
    overlap_grad_reduce: bool = False
    recompute_granularity: str | None = None  # None | full | selective
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    # Megatron's selective-recompute submodules; None = Megatron's default ["core_attn"]. Set
    # only from an explicit --recompute_modules (it needs --recompute_granularity selective).
    recompute_modules: list[str] | None = None

    def dp_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    @property
    def layout_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`mvlm.runtime.parallel.ParallelLayout`."""
        return {"tp": self.tp, "pp": self.pp, "cp": self.cp, "ep": self.ep, "etp": self.etp,
                "vpp": self.vpp}

    @property
    def recompute(self) -> RecomputeConfig:
        """The recompute flags as one value (checked against the model in transformer_config)."""
        return RecomputeConfig(self.recompute_granularity, self.recompute_method,
                               self.recompute_num_layers, self.recompute_modules)


@dataclass
class ScheduleConfig:
    """Batch sizes and how long to train. ``global_batch_size`` may stay None until the DP size
    is known (:meth:`TrainConfig.resolve_batch` fills it from --gradient_accumulation_steps)."""

    micro_batch_size: int = 1
    global_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    train_iters: int | None = None
    num_train_epochs: float | None = None


@dataclass
class OptimConfig:
    """Megatron-Core Adam (decoupled weight decay), its LR schedule, clipping and the NaN guard."""

    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"  # cosine | linear | constant | inverse-square-root
    lr_warmup_fraction: float | None = None
    lr_warmup_iters: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    vit_lr: float | None = None  # None: the main LR schedule
    aligner_lr: float | None = None
    check_for_nan_in_loss_and_grad: bool = True
    max_skipped_steps: int = 0


@dataclass
class FreezeConfig:
    """Which parameters train: the part flags (resolved: ms-swift's defaults applied), then
    name rules (``--freeze_parameters*``), then ``--trainable_parameters*``, which win."""

    freeze_vit: bool = True
    freeze_aligner: bool = True
    freeze_llm: bool = False
    # The part flags as passed (None: not given). The trainer objects only to explicit
    # --freeze_vit/--freeze_aligner on a text-only model, not to the defaults.
    freeze_vit_flag: bool | None = None
    freeze_aligner_flag: bool | None = None
    freeze_parameters: list[str] = field(default_factory=list)
    freeze_parameters_regex: str | None = None
    freeze_all: bool = False  # --freeze_parameters_ratio 1
    trainable_parameters: list[str] = field(default_factory=list)
    trainable_parameters_regex: str | None = None

    def name_rule(self) -> Callable[[str], bool | None]:
        """``rule(name) -> True (freeze) | False (keep trainable) | None (part flags decide)``
        for --freeze_parameters(_regex/_ratio 1) and --trainable_parameters(_regex)."""
        import re

        fre = re.compile(self.freeze_parameters_regex) if self.freeze_parameters_regex else None
        tre = re.compile(self.trainable_parameters_regex) \
            if self.trainable_parameters_regex else None

        def rule(name: str) -> bool | None:
            if any(name.startswith(p) for p in self.trainable_parameters) or \
                    (tre is not None and tre.search(name)):
                return False
            if self.freeze_all or any(name.startswith(p) for p in self.freeze_parameters) or \
                    (fre is not None and fre.search(name)):
                return True
            return None

        return rule


@dataclass
class TunerConfig:
    """``--train_type`` and the LoRA/DoRA flags (ms-swift names; mvlm.tuners.train_hooks)."""

    train_type: str = "full"  # full | lora | dora | lora_llm
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    target_regex: str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    adapters: str | None = None  # PEFT adapter dir to load
    merge_lora: bool = False
    use_dora: bool = False
    lora_bias: str = "none"  # validated: mvlm adapters train no biases
    lora_dtype: str | None = None  # validated: must equal --torch_dtype


@dataclass
class DataConfig:
    """The data flags (``mvlm encode`` and the data half of ``mvlm pt|sft``): what is read, how
    rows become tokens (template, truncation, loss mask), packing, media sizes, loader."""

    dataset: list[str] = field(default_factory=list)
    val_dataset: list[str] = field(default_factory=list)
    split_dataset_ratio: float = 0.0
    cached_dataset: str | None = None
    # The label mode (pt | sft | preference | rl): which tokens carry loss. It can differ from
    # the command (mvlm sft --loss_scale all trains pt labels).
    task: str = "sft"
    max_length: int | None = None
    truncation_strategy: str = "delete"
    packing: bool = False
    packing_length: int | None = None  # None: --max_length
    streaming: bool = False
    lazy_tokenize: bool = False
    dataset_num_proc: int = 1
    dataset_shuffle: bool = True
    # Seed of the dataset operations (#N sampling, the validation split, the shuffle before
    # training): --data_seed, else --seed.
    data_seed: int = 42
    system: str | None = None
    template_backend: str = "native"
    add_non_thinking_prefix: bool = False
    ignore_empty_think: bool = False
    max_pixels: int | None = None
    min_pixels: int | None = None
    image_max_token_num: int | None = None
    video_max_pixels: int | None = None
    video_max_token_num: int | None = None
    fps: float | None = None
    fps_max_frames: int | None = None
    image_backend: str = "pil"
    on_bad_sample: str = "error"
    columns: dict[str, str] | None = None  # --columns renames (parsed JSON)
    use_hf: bool | None = None
    hub_token: str | None = None
    model_name: tuple[str, ...] | None = None  # self-cognition {{NAME}} (zh, en)
    model_author: tuple[str, ...] | None = None  # self-cognition {{AUTHOR}} (zh, en)
    dataloader_num_workers: int = 0

    @property
    def row_length(self) -> int | None:
        """Packed row length: --packing_length (ms-swift), else --max_length."""
        return self.packing_length or self.max_length

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> DataConfig:
        """From parsed data flags by name (``vars(namespace)`` in the CLI layer). Flags a parser
        does not have keep their defaults; ``--data_seed`` (else ``--seed``) is the data seed;
        ``--columns`` is parsed (ValueError naming the flag)."""
        return cls(**_data_fields(cls, values))


def _data_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    from mvlm.data.flags import parse_columns

    names = {f.name for f in dataclasses.fields(cls) if f.init}
    out = {k: v for k, v in values.items() if k in names and v is not None}
    seed = values.get("data_seed")
    if seed is None:
        seed = values.get("seed")
    if seed is not None:
        out["data_seed"] = int(seed)
    out["columns"] = parse_columns(values.get("columns"))
    for k in ("model_name", "model_author"):
        if out.get(k) is not None:
            v = out[k]
            out[k] = tuple(v) if isinstance(v, (list, tuple)) else (str(v),)
    for k in ("dataset", "val_dataset"):
        if k in out:
            out[k] = list(out[k])
    return out


@dataclass(kw_only=True)
class EncodeConfig(DataConfig):
    """``mvlm encode``: the data flags plus the processor's checkpoint and the cache dir."""

    model: str
    output_dir: str
    dump: int = 0  # also write this many encoded samples as JSONL

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> EncodeConfig:
        return cls(**_data_fields(cls, values))


@dataclass
class EvalConfig:
    eval_interval: int | None = None  # steps between evaluations (None: only at the end)
    eval_iters: int | None = None  # global batches per evaluation (None: the whole val set)


@dataclass
class CheckpointConfig:
    """When and what to save, and where to resume from (checkpoints live in output_dir)."""

    save_interval: int | None = None
    save_total_limit: int | None = None
    save_strategy: str = "steps"  # steps | epoch | no
    save_optim: bool = True  # False: weights only (no exact resume)
    save_final_checkpoint: bool = True
    save_safetensors: bool = True  # the HF export at the end
    resume: str = "auto"  # auto | none | a checkpoint dir
    exit_interval: int | None = None


@dataclass
class LoggingConfig:
    log_interval: int = 1
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    logging_dir: str | None = None  # tensorboard dir (None: <output_dir>/runs)
    wandb_project: str = "mvlm"
    wandb_exp_name: str | None = None
    disable_tqdm: bool = False


@dataclass
class TrainConfig:
    """Everything ``mvlm pt|sft`` runs with, validated (:func:`mvlm.train.args.parse_train_args`).

    ``task`` is the command (pt | sft); ``data.task`` is the label mode. ``notes`` are the info
    lines of the flag mapping (one per alias/mapped/ignored flag), printed by rank 0."""

    task: str
    output_dir: str
    base: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 42  # model init / dropout / loader order (the data operations: data.data_seed)
    notes: list[str] = field(default_factory=list)

    def resolve_batch(self, world_size: int) -> None:
        """Fill global_batch_size from --gradient_accumulation_steps once the DP size is known,
        and check divisibility (global = micro * DP * micro-batches per step)."""
        s = self.schedule
        dp = self.parallel.dp_size(world_size)
        per_step = s.micro_batch_size * dp
        if s.global_batch_size is None:
            gas = s.gradient_accumulation_steps or 1
            s.global_batch_size = per_step * gas
            if s.gradient_accumulation_steps:
                self.notes.append(
                    f"--gradient_accumulation_steps {gas} -> --global_batch_size "
                    f"{s.global_batch_size} (= micro {s.micro_batch_size} x DP {dp} x {gas})")
        elif s.gradient_accumulation_steps and \
                s.global_batch_size != per_step * s.gradient_accumulation_steps:
            raise ValueError(
                f"--global_batch_size {s.global_batch_size} contradicts "
                f"--gradient_accumulation_steps {s.gradient_accumulation_steps} (micro "
                f"{s.micro_batch_size} x DP {dp} x {s.gradient_accumulation_steps} = "
                f"{per_step * s.gradient_accumulation_steps}): pass only one of them")
        if s.global_batch_size % per_step:
            raise ValueError(
                f"--global_batch_size {s.global_batch_size} is not a multiple of "
                f"--micro_batch_size {s.micro_batch_size} x data-parallel size {dp} = "
                f"{per_step}: choose a global batch size of k*{per_step}")
