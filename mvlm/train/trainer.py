"""The training loop behind `mvlm pt` and `mvlm sft`.

    torchrun --nproc-per-node N -m mvlm sft --model HF_DIR --dataset data.jsonl --tp 2 ...

Entry points: :func:`run_training` (argv list -> exit code; what the CLI and the demo call) and
:func:`train` (a parsed :class:`~mvlm.train.args.TrainConfig` -> :class:`TrainResult`).

One step = ``num_microbatches`` micro-batches per DP rank through Megatron-Core's
``get_forward_backward_func`` (1F1B or interleaved when PP > 1), gradients reduced by Megatron DDP
and divided by the global number of loss tokens (``calculate_per_token_loss``), one optimizer step
(clipping inside; a NaN/inf loss or grad norm is caught before it, see
``steps.checked_optimizer_step``), one scheduler step. Every ``--save_interval`` steps a
checkpoint; every ``--eval_interval`` steps an eval loss; at the end a final checkpoint and an HF
export.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mvlm.train.args import (
    TrainConfig,
    apply_hf_overrides,
    iterations_for_epochs,
    parse_train_args,
)

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


def _hf_dtype(hf_config) -> torch.dtype | None:
    from mvlm.convert.command import _hf_dtype as f

    return f(hf_config)


def _pad_to(batch: dict, seq: int, pad_id: int) -> dict:
    """Right-pad a micro-batch to ``seq`` tokens (pipeline stages exchange fixed shapes within a
    step). Pads carry no loss, position 0, and are masked as keys; packed rows get a longer tail
    (the tail is its own segment)."""
    s = batch["input_ids"].shape[1]
    if s == seq:
        return batch
    n = seq - s
    out = dict(batch)
    out["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, n), value=pad_id)
    out["labels"] = torch.nn.functional.pad(batch["labels"], (0, n), value=-100)
    if "loss_mask" in batch:
        out["loss_mask"] = torch.nn.functional.pad(batch["loss_mask"], (0, n), value=0)
    out["position_ids"] = torch.nn.functional.pad(batch["position_ids"], (0, n), value=0)
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, n),
                                                        value=False)
    return out


def _same_length(batches: list[dict], pp: int, ep: int, pad_id: int) -> list[dict]:
    """PP stages exchange one activation shape per step, and the CPU MoE all-gather dispatcher
    needs equal token counts on every EP rank: pad the step's micro-batches to one length (the
    max over the world when EP > 1). Packed micro-batches (N packed rows concatenated into one
    row) get a longer pad tail, which is a segment of its own and carries no loss."""
    if pp == 1 and ep == 1:
        return batches
    seq = max(b["input_ids"].shape[1] for b in batches)
    if ep > 1:
        t = torch.tensor([seq], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seq = int(t)
    return [_pad_to(b, seq, pad_id) for b in batches]


def _token_count(batch: dict) -> int:
    if batch.get("cu_seqlens") is not None:
        return int(batch["cu_seqlens"][-1])
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def _load_weights_only(bundle, path: Path) -> None:
    # [issue 9 / ckpt keys] either layer spec's checkpoints, format 1 and 2, TE _extra_state
    from mvlm.convert.mcore_ckpt import load_model_weights

    load_model_weights(bundle, Path(path))


def train(cfg: TrainConfig) -> TrainResult:
    """Run training per ``cfg`` on the ranks of this launch (collective on all of them)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoConfig

    from mvlm.convert.mcore_ckpt import dtype_from_name, read_meta
    from mvlm.data.encode import build_dataloader, build_train_dataset
    from mvlm.models.gpt import validate_layout
    from mvlm.models.registry import get_family
    from mvlm.models.spec import choose_backend
    from mvlm.models.vlm import build_model
    from mvlm.runtime.env import read_dist_env
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.train import checkpoint as ckpt
    from mvlm.train.logging import TrainLogger, bad_samples_fields
    from mvlm.train.optim import apply_freeze, build_optimizer, wrap_ddp
    from mvlm.train.schedule import build_scheduler, current_lr
    from mvlm.train.signals import EXIT_PREEMPTED, PreemptionHandler
    from mvlm.train.steps import (
        checked_optimizer_step,
        forward_step,
        microbatch_dims,
        reduce_stats,
        to_device,
    )

    # ---- everything that can fail cheaply, before any process group --------------------------
    layout = ParallelLayout(**cfg.layout_kwargs)
    world = read_dist_env().world_size
    layout.validate(world)
    cfg.resolve_batch(world)
    out_dir = Path(cfg.output_dir)
    src_dir = Path(cfg.model) if cfg.model else Path(cfg.mcore_model) / "hf"
    meta = read_meta(Path(cfg.mcore_model)) if cfg.mcore_model else None
    hf_config = AutoConfig.from_pretrained(src_dir)
    apply_hf_overrides(cfg, hf_config)  # [issue 9 / ms-swift flags] --moe_aux_loss_coeff
    family = get_family(hf_config.model_type)
    validate_layout(family.text_arch(hf_config), layout)
    cfg.recompute.megatron_kwargs(family.text_arch(hf_config), layout)  # layer-count checks
    # [issue 9 / ms-swift flags] freeze_vit/aligner default to true: only explicit flags count
    if (cfg.vit_lr is not None or cfg.aligner_lr is not None
            or getattr(cfg.ns, "freeze_vit", None) or getattr(cfg.ns, "freeze_aligner", None)) \
            and not family.is_vlm:
        raise ValueError(f"--vit_lr/--aligner_lr/--freeze_vit/--freeze_aligner: "
                         f"{hf_config.model_type} has no vision tower; drop those flags")

    own_pg = not dist.is_initialized()
    runtime = startup(layout, seed=cfg.seed, device=cfg.device)
    device, rank = runtime.device, runtime.rank
    if rank == 0:
        for n in cfg.notes:
            log.info("flag mapping: %s", n)
        if cfg.attn_impl not in (None, "auto") and family.is_vlm:
            from mvlm.models.vision import vision_attn_impl

            log.info("--attn_impl %s applies to the LLM decoder; the HF vision tower uses its "
                     "own %s attention", cfg.attn_impl, vision_attn_impl(device))
    try:
        default_dtype = (dtype_from_name(meta.get("dtype")) if meta else None) or \
            _hf_dtype(hf_config) or torch.float32
        dtype = dtype_from_name(cfg.torch_dtype, default_dtype)
        backend = choose_backend(device, cfg.transformer_impl)
        bundle = build_model(hf_config, layout, dtype=dtype, device=device, backend=backend,
                             sequence_parallel=cfg.sequence_parallel,
                             recompute=cfg.recompute, attn_impl=cfg.attn_impl or "auto",
                             perform_initialization=False,
                             vocab_padded=meta["vocab_padded"] if meta else None)
        resume_from = ckpt.find_resume(cfg.resume, out_dir)
        # [issue 6 / launch: mvlm/train/signals.py] a save killed mid-write leaves
        # .checkpoint-<step>.tmp-* behind (never named by `latest`, so resume ignores it anyway):
        # reclaim the space before this run saves anything.
        if rank == 0:
            from mvlm.train.signals import remove_stale_checkpoint_dirs

            for name in remove_stale_checkpoint_dirs(out_dir):
                log.info("removed %s (partial checkpoint of a killed save)", out_dir / name)
        adapter_run = cfg.ns.train_type != "full"  # mvlm.tuners: checkpoints hold adapters only
        if resume_from is None or adapter_run:
            if cfg.model:
                from mvlm.convert.bridge import load_hf_weights

                load_hf_weights(bundle, cfg.model)
            else:
                _load_weights_only(bundle, Path(cfg.mcore_model))
        mcfg = bundle.config
        mcfg.calculate_per_token_loss = True  # token-mean over the global batch (see steps.py)
        counts = apply_freeze(bundle, cfg)
        if adapter_run:  # mvlm.tuners: after weights + freeze flags, before DDP/optimizer
            from mvlm.tuners.train_hooks import setup_adapters

            report = setup_adapters(bundle, cfg.ns)
            counts = {"adapters": report.trainable, "total": report.total}
            if rank == 0:
                log.info("%s", report)
                print(f"mvlm {cfg.task}: {report}", flush=True)
        ddp_models = wrap_ddp(bundle, cfg)
        optimizer = build_optimizer(ddp_models, bundle, cfg)
        mcfg.finalize_model_grads_func = finalize_model_grads
        mcfg.grad_scale_func = optimizer.scale_loss
        if rank == 0:
            import json

            from mvlm.train.optim import param_groups_summary

            log.info("trainable parameters on rank 0: %s", counts)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "optimizer_groups.json").write_text(json.dumps(
                {"trainable_numel_rank0": counts,
                 "param_groups": param_groups_summary(optimizer)}, indent=1) + "\n")

        # ---- data -----------------------------------------------------------------------------
        dp = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        data = build_train_dataset(cfg.ns, str(src_dir), dp_rank=dp_rank, dp_size=dp)
        nmb = cfg.global_batch_size // (cfg.micro_batch_size * dp)
        train_iters = cfg.train_iters
        if train_iters is None:
            try:
                n_items = len(data.train)
            except TypeError:
                raise ValueError("--num_train_epochs needs a sized dataset: with --streaming "
                                 "pass --train_iters") from None
            train_iters = iterations_for_epochs(cfg.num_train_epochs, n_items,
                                                cfg.global_batch_size)
        # [issue 9 / ms-swift flags] --save_strategy epoch: save + eval at each epoch's last step
        epoch_ends: set[int] = set()
        if cfg.save_strategy == "epoch":
            from mvlm.train.args import epoch_end_steps

            try:
                n_epoch_items = len(data.train)
            except TypeError:
                raise ValueError("--save_strategy epoch needs a sized dataset: with "
                                 "--streaming use --save_steps") from None
            epoch_ends = epoch_end_steps(n_epoch_items, cfg.global_batch_size, train_iters)
        scheduler = build_scheduler(optimizer, cfg, train_iters)
        step, consumed, skipped = 0, 0, 0
        if resume_from is not None:
            state = ckpt.load_checkpoint(resume_from, bundle, optimizer, scheduler, layout)
            step, consumed = int(state["step"]), int(state["consumed_samples"])
            skipped = int(state.get("skipped_steps", 0))
            if rank == 0:
                log.info("resumed from %s at step %d (%d samples consumed)", resume_from, step,
                         consumed)
        pad_mult = 1
        if layout.cp > 1:
            pad_mult *= 2 * layout.cp
        if cfg.sequence_parallel:
            pad_mult *= layout.tp
        ns = cfg.ns
        loader = build_dataloader(
            data, micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp,
            consumed_samples=consumed, seed=cfg.seed, shuffle=getattr(ns, "dataset_shuffle", True),
            num_workers=cfg.dataloader_num_workers, pad_to_multiple_of=pad_mult,
            cp_size=layout.cp if data.packing else 1)
        data_iter = iter(loader)

        tlog = TrainLogger(out_dir, train_iters, step, rank, cfg.report_to,
                           tb_dir=cfg.logging_dir,  # [issue 9] --logging_dir/--tensorboard_dir
                           run_name=cfg.wandb_exp_name, project=cfg.wandb_project,
                           config={k: v for k, v in vars(cfg).items() if k != "ns"},
                           disable_bar=cfg.disable_tqdm)
        stopper = PreemptionHandler(device=None)
        try:
            stopper.install()
        except (RuntimeError, ValueError):
            stopper = None
        fb = get_forward_backward_func()
        n_chunks = len(ddp_models)
        result = TrainResult(step=step, consumed_samples=consumed)
        pad_id = data.pad_token_id

        def same_length(bs: list[dict]) -> list[dict]:
            return _same_length(bs, layout.pp, layout.ep, pad_id)

        def next_batches(it) -> list[dict]:
            return same_length([to_device(next(it), device) for _ in range(nmb)])

        def run_step(batches: list[dict], forward_only: bool):
            # rows as fed (1 for a packed micro-batch of N rows), not --micro_batch_size
            rows, seq = microbatch_dims(batches, layout.pp)
            iters = [iter(batches) for _ in range(n_chunks)] if n_chunks > 1 else iter(batches)
            return fb(forward_step_func=forward_step, data_iterator=iters, model=ddp_models,
                      num_microbatches=len(batches), seq_length=seq,
                      micro_batch_size=rows, forward_only=forward_only)

        def evaluate() -> dict[str, Any] | None:
            if data.val is None:
                return None
            for m in ddp_models:
                m.eval()
            try:
                n_val = len(data.val)
            except TypeError:
                n_val = None
            per_round = cfg.micro_batch_size * dp
            if n_val is not None and n_val < per_round:
                return None
            vloader = build_dataloader(data, split="val", micro_batch_size=cfg.micro_batch_size,
                                       dp_rank=dp_rank, dp_size=dp, shuffle=False,
                                       num_epochs=1, pad_to_multiple_of=pad_mult,
                                       cp_size=layout.cp if data.packing else 1)
            vit = iter(vloader)
            total = torch.zeros(2, dtype=torch.float64)
            rounds = (n_val // per_round) if n_val is not None else nmb
            if cfg.eval_iters:
                rounds = min(rounds, cfg.eval_iters * nmb)
            done = 0
            with torch.no_grad():
                while done < rounds:
                    k = min(nmb, rounds - done)
                    bs = same_length([to_device(next(vit), device) for _ in range(k)])
                    st = reduce_stats(run_step(bs, True), device)
                    total += torch.tensor([st.loss_sum, st.tokens], dtype=torch.float64)
                    done += k
            for m in ddp_models:
                m.train()
            return {"eval_loss": float(total[0] / max(1.0, float(total[1]))),
                    "eval_tokens": int(total[1])}

        def save(at: int) -> Path:
            path = ckpt.save_checkpoint(
                out_dir, at, bundle, optimizer, scheduler, layout, src_dir,
                {"consumed_samples": consumed, "skipped_steps": skipped,
                 "train_iters": train_iters, "task": cfg.task},
                save_total_limit=cfg.save_total_limit, save_optim=cfg.save_optim)
            if rank == 0:
                log.info("saved %s", path)
            return path

        dp_group = parallel_state.get_data_parallel_group()
        for m in ddp_models:
            m.train()
        last_saved: Path | None = None
        while step < train_iters:
            t_step = time.time()
            batches = next_batches(data_iter)
            local_tokens = sum(_token_count(b) for b in batches)
            for m in ddp_models:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            losses = run_step(batches, False)
            stats = reduce_stats(losses, device)
            # Raises NonFiniteLossError (same on every rank) before a bad update is applied.
            upd = checked_optimizer_step(optimizer, ddp_models, step + 1, stats.loss, skipped,
                                         cfg.max_skipped_steps,
                                         check=cfg.check_for_nan_in_loss_and_grad)
            grad_norm = upd.grad_norm
            lr = current_lr(optimizer)
            if upd.applied:
                scheduler.step(increment=1)
            else:  # Megatron's convention: a skipped update does not advance the LR schedule
                skipped += 1
            step += 1
            consumed += cfg.global_batch_size
            tok = torch.tensor([local_tokens], dtype=torch.float64)
            dist.all_reduce(tok, group=dp_group)
            dt = time.time() - t_step
            result.losses.append(stats.loss)
            result.grad_norms.append(grad_norm)
            if step % cfg.log_interval == 0 or step == train_iters:
                tlog.log({"step": step, "loss": stats.loss, "lr": lr, "grad_norm": grad_norm,
                          "consumed_samples": consumed, "loss_tokens": stats.tokens,
                          "tokens_per_sec": round(float(tok[0]) / max(dt, 1e-9), 1),
                          "step_time_s": round(dt, 4),
                          **({"skipped": upd.skipped_because} if not upd.applied else {}),
                          # [issue 16 / data: mvlm/train/logging.py] rows skipped, in the record
                          **(bad_samples_fields(data.bad_samples) if step == train_iters
                             else {})})
            tlog.advance(step)
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or step in epoch_ends:
                ev = evaluate()
                if ev is not None:
                    tlog.log({"step": step, **ev})
            result.step, result.consumed_samples = step, consumed
            if (cfg.save_interval and step % cfg.save_interval == 0) or step in epoch_ends:
                last_saved = save(step)
            stop = cfg.exit_interval is not None and step % cfg.exit_interval == 0 \
                and step < train_iters
            preempted = stopper is not None and stopper.should_stop()
            if stop or preempted:
                if last_saved is None or last_saved.name != ckpt.checkpoint_name(step):
                    last_saved = save(step)
                result.checkpoint = last_saved
                result.stopped_early = True
                result.exit_code = EXIT_PREEMPTED if preempted else 0
                if preempted and rank == 0:
                    stopper.clear_stop_file()
                tlog.close()
                return result
        tlog.close()
        if rank == 0:  # [issue 16 / data] the skip count, once, at the end of training
            log.info("bad samples: %s (rank 0's data pipeline; --on_bad_sample %s)",
                     data.bad_samples.summary(), getattr(cfg.ns, "on_bad_sample", "error"))
        if cfg.eval_interval and (step % cfg.eval_interval):
            ev = evaluate()
            if ev is not None and rank == 0:
                TrainLogger(out_dir, train_iters, step, rank, [], disable_bar=True).log(
                    {"step": step, **ev})
        if cfg.ns.save_final_checkpoint and (last_saved is None or
                                             last_saved.name != ckpt.checkpoint_name(step)):
            last_saved = save(step)
        result.checkpoint = last_saved
        if cfg.save_safetensors:
            from mvlm.convert.command import export_to_hf

            hf_out = out_dir / "hf"
            if adapter_run:  # mvlm.tuners: merged HF (--merge_lora true) or a PEFT adapter dir
                from mvlm.tuners.train_hooks import export_adapters

                hf_out = export_adapters(bundle, cfg.ns, src_dir, out_dir,
                                         _hf_dtype(hf_config) or dtype)
            else:
                export_to_hf(bundle, src_dir, hf_out, _hf_dtype(hf_config) or dtype,
                             overwrite=True)
            result.hf_dir = hf_out
            if rank == 0:
                log.info("HF safetensors: %s", hf_out)
                print(f"mvlm {cfg.task}: HF model written to {hf_out}", flush=True)
        if stopper is not None:
            stopper.uninstall()
        return result
    finally:
        if own_pg:
            from mvlm.runtime.parallel import destroy_distributed

            destroy_distributed()
        elif parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()


def run_training(argv: list[str], task: str = "sft") -> int:
    """`mvlm pt|sft` in-process: parse ``argv`` (flags only), train, return the exit code."""
    cfg = parse_train_args(argv, task)
    return train(cfg).exit_code
