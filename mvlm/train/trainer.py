"""The training loop behind `mvlm pt` and `mvlm sft`: the :class:`Trainer`.

    torchrun --nproc-per-node N -m mvlm sft --model HF_DIR --dataset data.jsonl --tp 2 ...

Entry points: :func:`run_training` (argv list -> exit code; what the CLI and the demo call),
:func:`train` (a parsed :class:`~mvlm.train.args.TrainConfig` -> :class:`TrainResult`), and the
:class:`Trainer` itself for callers that feed their own batches (``bench/gpu_check.py``, RL).

The Trainer is set up once (:meth:`Trainer.from_config`: model, weights, freezing/adapters, DDP,
optimizer, data, scheduler, resume) and then runs :meth:`Trainer.fit`. One
:meth:`Trainer.train_step` = ``num_microbatches`` micro-batches per DP rank through Megatron-Core's
``get_forward_backward_func`` (1F1B or interleaved when PP > 1) with the objective's forward step,
gradients reduced by Megatron DDP and divided by the global count of loss units
(``calculate_per_token_loss``), one optimizer step (clipping inside; a NaN/inf loss or grad norm
is caught before it, see ``steps.checked_optimizer_step``), one scheduler step. Every
``--save_interval`` steps a checkpoint; every ``--eval_interval`` steps an eval loss; at the end
a final checkpoint and an HF export.

What is trained for is the :class:`~mvlm.train.objectives.base.Objective` (``sft``, ``pt``, ...,
picked by name from :mod:`mvlm.train.objectives`); the loop never branches on it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mvlm.train import checkpoint as ckpt
from mvlm.train import steps
from mvlm.train.args import TrainConfig, parse_train_args
from mvlm.train.batches import same_length, token_count
from mvlm.train.objectives import get_objective
from mvlm.train.objectives.base import Objective
from mvlm.train.setup import RunPlan, build_bundle, load_initial_weights, plan_run
from mvlm.train.steps import StepStats, UpdateOutcome

log = logging.getLogger("mvlm.train")


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    step: int
    consumed_samples: int
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    hf_dir: Path | None = None
    stopped_early: bool = False
    exit_code: int = 0


@dataclass
class StepOutput:
    """One :meth:`Trainer.train_step`: global-batch stats, the update, its LR, tokens fed (all
    DP ranks, padding included -- the throughput count)."""

    stats: StepStats
    update: UpdateOutcome
    lr: float
    tokens: float


class Trainer:
    """Model chunks (DDP), optimizer, scheduler, data and checkpoints of one run, and the loop.

    ``cfg`` is read for the optimizer (lr, betas, clipping, vit/aligner LRs), DDP, the NaN guard
    (``check_for_nan_in_loss_and_grad``, ``max_skipped_steps``) and ``global_batch_size``;
    :meth:`from_config` adds data, scheduler and resume from a full
    :class:`~mvlm.train.args.TrainConfig`. ``bundle`` is the built, loaded, frozen (and adapted)
    model.
    """

    def __init__(self, cfg: TrainConfig, bundle: Any, layout: Any, *, objective: Objective,
                 device: str, rank: int = 0, out_dir: Path | None = None,
                 src_dir: Path | None = None):
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from mvlm.train.optim import build_optimizer, wrap_ddp

        self.cfg, self.bundle, self.layout, self.objective = cfg, bundle, layout, objective
        self.device, self.rank = device, rank
        if str(device).startswith("cpu"):  # keep freed step memory (runtime/cpu_malloc.py)
            from mvlm.runtime.cpu_malloc import tune_for_training

            tune_for_training()
        self.out_dir, self.src_dir = out_dir, src_dir
        mcfg = bundle.config
        mcfg.calculate_per_token_loss = True  # count-mean over the global batch (steps.py)
        objective.extend_model(self)  # e.g. the reward model's value head, before DDP
        self.ddp_models = wrap_ddp(bundle, cfg)
        self.optimizer = build_optimizer(self.ddp_models, bundle, cfg)
        mcfg.finalize_model_grads_func = finalize_model_grads
        mcfg.grad_scale_func = self.optimizer.scale_loss
        self.scheduler: Any = None
        self.train_iters = 0
        self.step = self.consumed = self.skipped = 0
        self.last_saved: Path | None = None
        self.data: Any = None
        self.num_microbatches = 1
        self.pad_id: int | None = None
        self.epoch_ends: set[int] = set()
        self.adapter_run = False
        self.export_dtype: torch.dtype | None = None
        self._data_iter: Any = None
        self._repeats: list[dict] = []  # micro-batches handed out again (repeat_batches)
        self._tlog: Any = None
        self._stopper: Any = None
        self._fb = get_forward_backward_func()
        self._dp_group = parallel_state.get_data_parallel_group()
        objective.setup(self)

    # ---- set-up ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: TrainConfig, plan: RunPlan, runtime: Any,
                    objective: Objective | None = None) -> Trainer:
        """Everything once, in the order the numbers depend on: model, weights (unless resuming
        a full run), freezing, adapters, DDP + optimizer, data, scheduler, resume, loader.
        ``objective`` defaults to the one registered under the command's name (``cfg.task``)."""
        from mvlm.train.optim import apply_freeze

        bundle, dtype = build_bundle(cfg, plan, runtime.device)
        resume_from = ckpt.find_resume(cfg.ckpt.resume, plan.out_dir)
        if runtime.rank == 0:  # a save killed mid-write leaves staging dirs: reclaim the space
            from mvlm.train.signals import remove_stale_checkpoint_dirs

            for name in remove_stale_checkpoint_dirs(plan.out_dir):
                log.info("removed %s (partial checkpoint of a killed save)", plan.out_dir / name)
        adapter_run = cfg.tuner.train_type != "full"  # mvlm.tuners: checkpoints hold adapters only
        if resume_from is None or adapter_run:
            load_initial_weights(cfg, bundle)
        counts = apply_freeze(bundle, cfg)
        if adapter_run:  # mvlm.tuners: after weights + freeze flags, before DDP/optimizer
            from mvlm.tuners.train_hooks import setup_adapters

            report = setup_adapters(bundle, cfg)
            counts = {"adapters": report.trainable, "total": report.total}
            if runtime.rank == 0:
                log.info("%s", report)
                print(f"mvlm {cfg.task}: {report}", flush=True)
        self = cls(cfg, bundle, plan.layout, objective=objective or get_objective(cfg.task),
                   device=runtime.device, rank=runtime.rank, out_dir=plan.out_dir,
                   src_dir=plan.src_dir)
        self.adapter_run = adapter_run
        self.export_dtype = plan.hf_dtype or dtype
        self._write_param_groups(counts)
        self._attach_data(plan)
        self.build_scheduler(self.train_iters)
        if resume_from is not None:
            self.load(resume_from)
        self._open_loader()
        return self

    def _write_param_groups(self, counts: dict[str, int]) -> None:
        if self.rank != 0:
            return
        import json

        from mvlm.train.optim import param_groups_summary

        log.info("trainable parameters on rank 0: %s", counts)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "optimizer_groups.json").write_text(json.dumps(
            {"trainable_numel_rank0": counts,
             "param_groups": param_groups_summary(self.optimizer)}, indent=1) + "\n")

    def _attach_data(self, plan: RunPlan) -> None:
        """The dataset of this DP rank, micro-batches per step, the step count, epoch ends."""
        from megatron.core import parallel_state

        from mvlm.data.encode import build_train_dataset
        from mvlm.train.args import epoch_end_steps, iterations_for_epochs

        cfg = self.cfg
        dp = parallel_state.get_data_parallel_world_size()
        s = cfg.schedule
        self.data = build_train_dataset(cfg.data, str(plan.src_dir), dp_size=dp, schedule=s,
                                        dp_rank=parallel_state.get_data_parallel_rank())
        self.pad_id = self.data.pad_token_id
        self.num_microbatches = s.global_batch_size // (s.micro_batch_size * dp)
        self.train_iters = s.train_iters
        if self.train_iters is None:
            n = _sized(self.data.train, "--num_train_epochs", "pass --train_iters")
            self.train_iters = iterations_for_epochs(s.num_train_epochs, n, s.global_batch_size)
        # [issue 9 / ms-swift flags] --save_strategy epoch: save + eval at each epoch's last step
        if cfg.ckpt.save_strategy == "epoch":
            n = _sized(self.data.train, "--save_strategy epoch", "use --save_steps")
            self.epoch_ends = epoch_end_steps(n, s.global_batch_size, self.train_iters)

    def build_scheduler(self, train_iters: int) -> None:
        """The LR schedule over ``train_iters`` steps (resume restores its state afterwards)."""
        from mvlm.train.schedule import build_scheduler

        self.train_iters = train_iters
        self.scheduler = build_scheduler(self.optimizer, self.cfg, train_iters)

    def _loader(self, split: str = "train", **kw: Any) -> Any:
        from megatron.core import parallel_state

        from mvlm.data.encode import build_dataloader

        pad_mult = 2 * self.layout.cp if self.layout.cp > 1 else 1
        if self.cfg.parallel.sequence_parallel:
            pad_mult *= self.layout.tp
        return build_dataloader(
            self.data, split=split, micro_batch_size=self.cfg.schedule.micro_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(), pad_to_multiple_of=pad_mult,
            cp_size=self.layout.cp if self.data.packing else 1, **kw)

    def _open_loader(self) -> None:
        cfg = self.cfg
        self._data_iter = iter(self._loader(
            consumed_samples=self.consumed, seed=cfg.seed,
            shuffle=cfg.data.dataset_shuffle,
            num_workers=cfg.data.dataloader_num_workers))

    def build_frozen_model(self, hf_dir: str | Path | None = None) -> Any:
        """A second copy of the run's starting weights (or of the HF checkpoint ``hf_dir``,
        whose architecture the caller has checked) on the same layout, frozen, in eval mode:
        what an objective's :meth:`~Objective.setup` keeps as a reference model."""
        from mvlm.models.vlm import build_model

        b = self.bundle
        hf_config = b.hf_config
        if hf_dir is not None:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(hf_dir)
        ref = build_model(hf_config, self.layout, dtype=b.config.params_dtype,
                          device=self.device, backend=b.backend,
                          sequence_parallel=self.cfg.parallel.sequence_parallel,
                          attn_impl=self.cfg.base.attn_impl or "auto",
                          perform_initialization=False, vocab_padded=b.vocab_padded)
        if hf_dir is None:
            load_initial_weights(self.cfg, ref)
        else:
            from mvlm.convert.bridge import load_hf_weights

            load_hf_weights(ref, hf_dir)
        ref.config.calculate_per_token_loss = True
        for m in ref.models:
            m.requires_grad_(False)
            m.eval()
        return ref

    # ---- one step ------------------------------------------------------------------------------
    def next_batches(self, it: Any = None, n: int | None = None) -> list[dict]:
        """The next ``n`` (default: a step's) micro-batches of this DP rank: the ones queued by
        :meth:`repeat_batches` first, then the loader's. ``consumed`` counts loader reads only
        (all DP ranks), so it is where a resumed run reopens the loader."""
        n = self.num_microbatches if n is None else n
        if it is None and self._repeats:
            out, self._repeats = self._repeats[:n], self._repeats[n:]
            return out
        own = it is None
        it = self._data_iter if own else it
        if it is None:
            raise RuntimeError("this Trainer has no data: build it with Trainer.from_config or "
                               "pass batches to train_step")
        out = [next(it) for _ in range(n)]
        if own:
            from megatron.core import parallel_state

            self.consumed += n * self.cfg.schedule.micro_batch_size * \
                parallel_state.get_data_parallel_world_size()
        return out

    def repeat_batches(self, batches: list[dict], times: int) -> None:
        """Hand ``batches`` (micro-batches of this DP rank) to the next ``times`` calls of
        :meth:`next_batches` again before the loader moves on: an objective that trains on one
        batch for several steps (GRPO's ``--num_iterations``, TRL's ``RepeatSampler`` order).
        The queue is part of the checkpoint, so a run resumed mid-way gets them too."""
        self._repeats.extend(dict(b) for _ in range(times) for b in batches)

    def prepare_batches(self, batches: list[dict]) -> list[dict]:
        """On the device, one length where PP/EP need it, checked and completed by the
        objective."""
        batches = [steps.to_device(b, self.device) for b in batches]
        batches = same_length(batches, self.layout.pp, self.layout.ep, self.pad_id)
        for b in batches:
            self.objective.check_batch(b)
        return self.objective.prepare_step(self, batches)

    def run_schedule(self, models: list[Any], batches: list[dict], step_func: Any,
                     forward_only: bool) -> list[dict]:
        """``batches`` through Megatron-Core's forward-backward schedule on ``models``."""
        rows, seq = steps.microbatch_dims(batches, self.layout.pp)
        n = len(models)
        its = [iter(batches) for _ in range(n)] if n > 1 else iter(batches)
        return self._fb(forward_step_func=step_func, data_iterator=its, model=models,
                        num_microbatches=len(batches), seq_length=seq, micro_batch_size=rows,
                        forward_only=forward_only)

    def forward_only(self, models: list[Any], batches: list[dict], step_func: Any) -> list[dict]:
        """A no-grad pass (eval, or a reference model inside an objective's prepare_step)."""
        with torch.no_grad():
            return self.run_schedule(models, batches, step_func, True)

    def train_step(self, batches: list[dict]) -> StepOutput:
        """Forward + backward over the micro-batches, guarded optimizer and scheduler step."""
        if self.scheduler is None:
            raise RuntimeError("Trainer.train_step needs an LR schedule: call "
                               "build_scheduler(train_iters) first")
        batches = self.prepare_batches(batches)
        local_tokens = sum(token_count(b) for b in batches)
        for m in self.ddp_models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.run_schedule(self.ddp_models, batches, self.objective.forward_step, False)
        stats = steps.reduce_stats(losses, self.device, self.objective.metrics)
        # Raises NonFiniteLossError (same on every rank) before a bad update is applied.
        upd = steps.checked_optimizer_step(
            self.optimizer, self.ddp_models, self.step + 1, stats.loss, self.skipped,
            self.cfg.optim.max_skipped_steps, check=self.cfg.optim.check_for_nan_in_loss_and_grad)
        lr = _current_lr(self.optimizer)
        if upd.applied:
            self.scheduler.step(increment=1)
        else:  # Megatron's convention: a skipped update does not advance the LR schedule
            self.skipped += 1
        self.step += 1
        tok = torch.tensor([local_tokens], dtype=torch.float64)
        dist.all_reduce(tok, group=self._dp_group)
        return StepOutput(stats, upd, lr, float(tok[0]))

    def evaluate(self) -> dict[str, Any] | None:
        """Mean eval loss (and the objective's other metrics) over the validation split, or
        None without one (or with fewer rows than one round of micro-batches x DP)."""
        from megatron.core import parallel_state

        if self.data is None or self.data.val is None:
            return None
        per_round = self.cfg.schedule.micro_batch_size * \
            parallel_state.get_data_parallel_world_size()
        n_val = _len_or_none(self.data.val)
        if n_val is not None and n_val < per_round:
            return None
        rounds = (n_val // per_round) if n_val is not None else self.num_microbatches
        if self.cfg.eval.eval_iters:
            rounds = min(rounds, self.cfg.eval.eval_iters * self.num_microbatches)
        vit = iter(self._loader("val", shuffle=False, num_epochs=1))
        totals = torch.zeros(2 * len(self.objective.metrics), dtype=torch.float64)
        for m in self.ddp_models:
            m.eval()
        done = 0
        while done < rounds:
            k = min(self.num_microbatches, rounds - done)
            bs = self.prepare_batches(self.next_batches(vit, k))
            st = steps.reduce_stats(self.forward_only(self.ddp_models, bs,
                                                      self.objective.forward_step),
                                    self.device, self.objective.metrics)
            totals += torch.tensor(st.sums(self.objective.metrics), dtype=torch.float64)
            done += k
        for m in self.ddp_models:
            m.train()
        out = {"eval_loss": float(totals[0] / max(1.0, float(totals[1]))),
               "eval_tokens": int(totals[1])}
        for i, key in enumerate(self.objective.metrics[1:], start=1):
            out[f"eval_{key}"] = float(totals[2 * i] / max(1.0, float(totals[2 * i + 1])))
        return out

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, step: int | None = None) -> Path:
        """Collective: checkpoint-<step> (model, optimizer, scheduler, RNG, data position)."""
        at = self.step if step is None else step
        cfg = self.cfg
        path = ckpt.save_checkpoint(
            self.out_dir, at, self.bundle, self.optimizer, self.scheduler, self.layout,
            self.src_dir, {"consumed_samples": self.consumed, "skipped_steps": self.skipped,
                           "train_iters": self.train_iters, "task": cfg.task,
                           "repeat_batches": len(self._repeats)},
            save_total_limit=cfg.ckpt.save_total_limit, save_optim=cfg.ckpt.save_optim,
            rank_state=self._rank_state())
        if self.rank == 0:
            log.info("saved %s", path)
        self.last_saved = path
        return path

    def load(self, path: Path) -> None:
        """Collective: restore a checkpoint and the step, sample and skip counters."""
        state = ckpt.load_checkpoint(path, self.bundle, self.optimizer, self.scheduler,
                                     self.layout)
        self.step, self.consumed = int(state["step"]), int(state["consumed_samples"])
        self.skipped = int(state.get("skipped_steps", 0))
        self._load_rank_state(path, state)
        if self.rank == 0:
            log.info("resumed from %s at step %d (%d samples consumed)", path, self.step,
                     self.consumed)

    def _rank_state(self) -> dict | None:
        obj = self.objective.state_dict()
        if not self._repeats and obj is None:
            return None
        return {"repeats": self._repeats, "objective": obj}

    def _load_rank_state(self, path: Path, state: dict) -> None:
        """The batches queued for repeat and the objective's state, saved per rank: restored
        on the same layout (as the RNG states are); batches queued for repeat cannot move to
        another layout, so such a checkpoint is refused there."""
        if state.get("layout") != asdict(self.layout) or \
                state.get("world_size") != dist.get_world_size():
            if state.get("repeat_batches"):  # in trainer_state.json: the same on every rank
                raise ValueError(
                    f"{path} was saved while a batch was being reused (e.g. a rollout over "
                    f"--num_iterations steps) on layout {state.get('layout')}: resume it on "
                    "that layout, or from a checkpoint of a step that starts a new batch")
            if self.rank == 0 and ckpt.rank_state_file(path).exists():
                log.info("resuming at a different layout: the objective's state not restored")
            return
        f = ckpt.rank_state_file(path)
        if not f.exists():
            return
        rs = torch.load(f, weights_only=False)
        self._repeats = [steps.to_device(b, self.device) for b in rs["repeats"]]
        self.objective.load_state_dict(self, rs["objective"])

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until ``train_iters`` or a stop request (``--exit_interval``, a signal)."""
        result = TrainResult(step=self.step, consumed_samples=self.consumed)
        self._open_run()
        while self.step < self.train_iters:
            t0 = time.time()
            out = self.train_step(self.next_batches())
            self._log_step(out, time.time() - t0)
            result.losses.append(out.stats.loss)
            result.grad_norms.append(out.update.grad_norm)
            if self._due(self.cfg.eval.eval_interval):
                self._log_eval()
            result.step, result.consumed_samples = self.step, self.consumed
            if self._due(self.cfg.ckpt.save_interval):
                self.save()
            if self._stop_requested(result):
                return result
        return self._finish(result)

    def _due(self, interval: int | None) -> bool:
        return bool(interval and self.step % interval == 0) or self.step in self.epoch_ends

    def _open_run(self) -> None:
        from mvlm.train.logging import TrainLogger
        from mvlm.train.signals import PreemptionHandler

        cfg = self.cfg
        self._tlog = TrainLogger(self.out_dir, self.train_iters, self.step, self.rank,
                                 cfg.log.report_to, tb_dir=cfg.log.logging_dir,
                                 run_name=cfg.log.wandb_exp_name, project=cfg.log.wandb_project,
                                 config=asdict(cfg),
                                 disable_bar=cfg.log.disable_tqdm)
        self._stopper = PreemptionHandler(device=None)
        try:
            self._stopper.install()
        except (RuntimeError, ValueError):
            self._stopper = None
        for m in self.ddp_models:
            m.train()

    def _log_step(self, out: StepOutput, dt: float) -> None:
        from mvlm.train.logging import bad_samples_fields

        s, last = self.step, self.step == self.train_iters
        if s % self.cfg.log.log_interval == 0 or last:
            upd = out.update
            self._tlog.log({
                "step": s, "loss": out.stats.loss, "lr": out.lr, "grad_norm": upd.grad_norm,
                "consumed_samples": self.consumed, "loss_tokens": out.stats.tokens,
                **out.stats.extra,
                "tokens_per_sec": round(out.tokens / max(dt, 1e-9), 1),
                "step_time_s": round(dt, 4),
                **({"skipped": upd.skipped_because} if not upd.applied else {}),
                # [issue 16 / data] rows skipped, in the last record
                **(bad_samples_fields(self.data.bad_samples) if last else {})})
        self._tlog.advance(s)

    def _log_eval(self) -> None:
        ev = self.evaluate()
        if ev is not None:
            self._tlog.log({"step": self.step, **ev})

    def _stop_requested(self, result: TrainResult) -> bool:
        """--exit_interval or a preemption signal (agreed by all ranks): save, mark, close."""
        from mvlm.train.signals import EXIT_PREEMPTED

        every = self.cfg.ckpt.exit_interval
        stop = every is not None and self.step % every == 0 and self.step < self.train_iters
        preempted = self._stopper is not None and self._stopper.should_stop()
        if not (stop or preempted):
            return False
        if self.last_saved is None or self.last_saved.name != ckpt.checkpoint_name(self.step):
            self.save()
        result.checkpoint = self.last_saved
        result.stopped_early = True
        result.exit_code = EXIT_PREEMPTED if preempted else 0
        if preempted and self.rank == 0:
            self._stopper.clear_stop_file()
        self._tlog.close()
        return True

    def _finish(self, result: TrainResult) -> TrainResult:
        """After the last step: final eval, final checkpoint, HF (or PEFT) export."""
        from mvlm.train.logging import TrainLogger

        cfg = self.cfg
        self._tlog.close()
        if self.rank == 0:  # [issue 16 / data] the skip count, once, at the end of training
            log.info("bad samples: %s (rank 0's data pipeline; --on_bad_sample %s)",
                     self.data.bad_samples.summary(), cfg.data.on_bad_sample)
        if cfg.eval.eval_interval and (self.step % cfg.eval.eval_interval):
            ev = self.evaluate()
            if ev is not None and self.rank == 0:
                TrainLogger(self.out_dir, self.train_iters, self.step, self.rank, [],
                            disable_bar=True).log({"step": self.step, **ev})
        if cfg.ckpt.save_final_checkpoint and (
                self.last_saved is None
                or self.last_saved.name != ckpt.checkpoint_name(self.step)):
            self.save()
        result.checkpoint = self.last_saved
        if cfg.ckpt.save_safetensors:
            result.hf_dir = self.export()
        if self._stopper is not None:
            self._stopper.uninstall()
        return result

    def export(self) -> Path:
        """Collective: the trained model as an HF safetensors dir (a merged model or a PEFT
        adapter dir for adapter runs, see mvlm.tuners)."""
        from mvlm.convert.command import export_to_hf

        after = self.objective.before_export(self)
        if self.adapter_run:
            from mvlm.tuners.train_hooks import export_adapters

            hf_out = export_adapters(self.bundle, self.cfg, self.src_dir, self.out_dir,
                                     self.export_dtype)
        else:
            hf_out = self.out_dir / "hf"
            export_to_hf(self.bundle, self.src_dir, hf_out, self.export_dtype, overwrite=True)
        if after is not None:
            after(hf_out)
        if self.rank == 0:
            log.info("HF safetensors: %s", hf_out)
            print(f"mvlm {self.cfg.task}: HF model written to {hf_out}", flush=True)
        return hf_out


def _current_lr(optimizer: Any) -> float:
    from mvlm.train.schedule import current_lr

    return current_lr(optimizer)


def _len_or_none(ds: Any) -> int | None:
    try:
        return len(ds)
    except TypeError:
        return None


def _sized(ds: Any, flag: str, instead: str) -> int:
    n = _len_or_none(ds)
    if n is None:
        raise ValueError(f"{flag} needs a sized dataset: with --streaming {instead}") from None
    return n


def train(cfg: TrainConfig, objective: Objective | None = None) -> TrainResult:
    """Run training per ``cfg`` on the ranks of this launch (collective on all of them), for
    ``objective`` (default: the one registered under ``cfg.task``)."""
    from mvlm.runtime.startup import startup
    from mvlm.train.setup import log_notes, teardown

    plan = plan_run(cfg)  # everything that can fail cheaply, before any process group
    own_pg = not dist.is_initialized()
    runtime = startup(plan.layout, seed=cfg.seed, device=cfg.base.device)
    if runtime.rank == 0:
        log_notes(cfg, plan, runtime.device)
    try:
        return Trainer.from_config(cfg, plan, runtime, objective).fit()
    finally:
        teardown(own_pg)


def run_training(argv: list[str], task: str = "sft") -> int:
    """`mvlm pt|sft` in-process: parse ``argv`` (flags only), train, return the exit code."""
    cfg = parse_train_args(argv, task)
    return train(cfg).exit_code
