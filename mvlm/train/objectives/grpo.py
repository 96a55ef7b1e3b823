"""``grpo``: the GRPO family (every ``--loss_type``, advantage estimator and importance-sampling
level of :mod:`mvlm.rl.grpo_loss`) on the Trainer, rolling out with the built-in engine.

The Trainer's loop does not know it is running RL: everything method-specific happens in the two
hooks of the Objective interface.

:meth:`GRPOObjective.prepare_step` (before each step's schedule) turns the loader's prompt
micro-batches (data task ``rl``: the prompt ending with the generation prompt, no labels) into
training micro-batches:

1. **Rollout** on the current policy (:class:`~mvlm.rl.rollout.builtin.BuiltinRolloutEngine` on
   the training model's own chunks: no weight copy, no sync) -- ``--num_generations``
   completions per prompt, each with the engine's per-token log-probs.
2. **Rows**: prompt + completion per row, right-padded to the step's longest row; ``labels``
   are the completion tokens at the position that predicts them (Megatron's next-token
   alignment), so the per-token output of a forward is minus the log-prob of each sampled token.
   The trainer's log-probs are tempered like the engine's (``log_softmax(logits / temperature)``,
   TRL's and ms-swift's convention): :func:`tempered_output` replaces the model's loss head.
3. **Trainer log-probs of the rollout policy** (one no-grad pass, eval mode) before any update:
   they are the ``old`` log-probs of the clipped ratio when ``--num_iterations`` > 1, and they are
   compared with the engine's on every rollout -- ``token_mult_prob_error`` = mean
   exp|dlogp|, ``logp_abs_diff_max`` -- stopping the run above ``--max_logprob_mismatch``
   before the first update on that batch.
4. **Reference log-probs** when ``--beta`` != 0: the policy with its adapters off under LoRA,
   else a frozen copy of the starting weights (``Trainer.build_frozen_model``).
5. **Rewards** on the decoded completions, **advantages** over the whole rollout batch (rewards
   all-gathered over the data-parallel group, every rank keeps its slice), DAPO's
   ``--overlong_filter`` on the loss mask.
6. **Global denominators** (:class:`~mvlm.rl.grpo_loss.LossDenominators`): loss tokens and
   completions of the whole step, summed over micro-batches and all-reduced over DP, so every
   layout computes the same loss.

With ``--num_iterations`` k, one rollout batch is trained on for k consecutive optimizer steps
(the ratio to the rollout policy is then no longer 1 after the first). As TRL's
``RepeatSampler`` does, the k-1 reusing steps are handed the rollout's prompt batches again (put
through :meth:`Trainer.repeat_batches`), so the data advances by one global batch per rollout
and no prompt is skipped; a reusing step checks that it got them. A checkpoint holds the queued
batches and the rollout being reused (:meth:`GRPOObjective.state_dict`, per rank), so a run
resumed mid-way continues as the uninterrupted one.

Prompts with images: each prompt's media (``pixel_values`` / ``image_grid_thw`` or whatever keys
the family declares) are split out of the loader's micro-batch (:mod:`mvlm.rl.media`) and go to
the engine with the prompt, and again with every training row of that prompt (repeated per
completion), whose position ids are the family's (mRoPE) positions of prompt + completion. A
training micro-batch without images has no media keys; ``model_forward`` keeps the vision tower
in the graph with a zero term, so DP ranks reduce the same gradients.

``--dynamic_sample`` (DAPO): groups whose rewards are all equal are dropped and further prompt
batches are rolled out (up to ``--max_resample_times``), see :meth:`GRPOObjective._collect`.
CHORD (``--chord_sft_dataset``): an expert SFT micro-batch joins each step, see
:meth:`GRPOObjective._with_chord`.

Reduction (the Trainer's per-unit contract): ``grpo_loss`` returns each micro-batch's share of
the step loss, already divided by the global counts. The unit reported to Megatron is the
completion: ``loss_sum = share * N_seq`` (``N_seq`` = the step's completions over DP) and
``count`` = the micro-batch's completions, so Megatron's division by the summed count gives back
the sum of the shares -- the step loss, identical on every layout.

Step metrics (ms-swift / TRL names; written to ``logging.jsonl``): ``reward``, ``reward_std``,
``rewards/<func>/mean|std``, ``frac_reward_zero_std``, ``completions/mean_length|min_length|
max_length|clipped_ratio``, ``token_mult_prob_error``, ``logp_abs_diff_max``, ``time/rollout_s``
and ``time/logps_s`` (the no-grad passes; the rest of ``step_time_s`` is the update), and from the
loss ``kl``, ``clip_ratio/low_mean|high_mean|region_mean`` (or ``clip_ratio/cispo``),
``ratio/mean``, ``entropy`` (of the tempered policy at the completion tokens),
``rollout_is/*`` with ``--rollout_importance_sampling_mode``.

Context parallelism: the built-in engine generates with CP switched off for the call (every CP
rank runs the whole, short, sequence; :func:`mvlm.rl.rollout.builtin.cp_switched_off`). Training
rows are padded to a multiple of 2 x CP and split by the model; each CP rank's per-token
log-probs (and entropies) are all-gathered into the whole sequences (:func:`cp_full_sequence`,
differentiable), so the old/reference log-probs, the mismatch check and the loss -- whose
sequence-level terms are not linear in the tokens -- are computed exactly as without CP, on
every CP rank. Each CP rank reports the micro-batch's completions as its count: Megatron's
division by the count summed over DP x CP then cancels the CP-fold sum of the gathered
log-probs' gradients (as in :mod:`mvlm.train.objectives.dpo`).

CHORD under pipeline parallelism: the stages exchange one activation shape per step, so the
expert rows go in micro-batches of the GRPO micro-batches' row count (split with their media,
the last filled with empty rows) and every micro-batch of the step is right-padded to one length.

Refused with a message (not silently ignored): CHORD with context parallelism (the expert
micro-batch's SFT term would need its own CP split).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist

from mvlm.train.objectives.base import LossOutput, Objective, cp_info, token_logps
from mvlm.train.steps import model_forward, unwrap

if TYPE_CHECKING:
    from mvlm.rl.flags import GRPOConfigs
    from mvlm.rl.rollout.base import RolloutGroup, SamplingParams
    from mvlm.train.trainer import Trainer

STEP_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                "completions/min_length", "completions/max_length", "completions/clipped_ratio",
                "token_mult_prob_error", "logp_abs_diff_max", "time/rollout_s", "time/logps_s")


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position from vocab-parallel (TP-sharded) logits,
    without gradient: max, sum exp and sum exp * z all-reduced over the TP group. Masked
    (``-inf``) vocabulary padding contributes nothing."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    z = logits.detach().float()
    mx = z.max(-1, keepdim=True).values
    if tp > 1:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    zc = z - mx
    e = zc.exp()
    sums = torch.stack([e.sum(-1), torch.where(e > 0, e * zc, 0.0).sum(-1)])
    if tp > 1:
        dist.all_reduce(sums, group=group)
    return sums[0].log() - sums[1] / sums[0]


def tempered_output(model: Any, batch: dict, temperature: float,
                    entropy: bool = False) -> torch.Tensor:
    """Per-token ``-log_softmax(logits / temperature)[label]`` (0 where ``labels < 0``) on the
    last stage, hidden states before it: the model's own loss head with the logits tempered
    first, as the rollout engine tempers them (vocab-parallel cross-entropy on TP shards).
    ``entropy``: also put the tempered distribution's per-token entropy in
    ``batch["entropies"]`` (the loss of the same micro-batch reads it)."""
    from megatron.core import tensor_parallel

    from mvlm.runtime.cp import split_for_cp

    out = model_forward(model, {k: v for k, v in batch.items() if k != "labels"})
    if not unwrap(model).post_process:
        return out
    size, rank, _ = cp_info()
    labels = split_for_cp(batch["labels"], 1, size, rank)  # the logits are this CP rank's chunk
    logits = out.float()
    if temperature != 1.0:
        logits = logits / temperature
    if entropy:
        batch["entropies"] = cp_full_sequence(vocab_parallel_entropy(logits))
    ce = tensor_parallel.vocab_parallel_cross_entropy(
        logits.transpose(0, 1).contiguous(), labels.clamp(min=0).transpose(0, 1).contiguous())
    return ce.transpose(0, 1).contiguous() * (labels >= 0)


class _GatherCP(torch.autograd.Function):
    """All-gather of [b, s_local] chunks along dim 1 over the CP group (in rank order).
    Backward: every rank's gradient of the gathered tensor summed over the group, this rank's
    chunk of it (each CP rank computes the same loss from the gathered sequence)."""

    @staticmethod
    def forward(ctx, x, group, size, rank):  # noqa: ANN001
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.n = group, rank, x.shape[1]
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[:, ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None, None


def cp_full_sequence(x: torch.Tensor) -> torch.Tensor:
    """This CP rank's per-token chunk [b, s_local] (the model's zigzag split,
    :func:`mvlm.runtime.cp.cp_chunk_indices`) -> the whole sequence [b, s] in order, on every
    CP rank, differentiable; ``x`` itself without CP."""
    from mvlm.runtime.cp import cp_chunk_indices

    size, rank, group = cp_info()
    if size == 1:
        return x
    full = _GatherCP.apply(x, group, size, rank)
    s = full.shape[1]
    order = torch.cat([cp_chunk_indices(s, size, r, device=x.device) for r in range(size)])
    return full[:, torch.argsort(order)]


def _dp() -> tuple[int, int, Any]:
    from megatron.core import parallel_state

    return (parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_group())


def _all_gather_rows(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """Concatenate equal-shaped per-rank tensors along dim 0, in DP-rank order."""
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


# per-token keys of GRPO / expert micro-batches and what pads them (input_ids: the pad id)
_SEQ_PAD = {"labels": -100, "attention_mask": False, "position_ids": 0, "rollout_logps": 0.0,
            "completion_mask": 0.0, "old_logps": 0.0, "ref_logps": 0.0}


def _pad_seq(batch: dict, seq: int, pad_id: int) -> dict:
    """Right-pad every per-token tensor of a micro-batch to ``seq`` positions (nothing to
    predict, nothing attended: the loss is unchanged)."""
    s = batch["input_ids"].shape[-1]
    if s == seq:
        return batch
    out = dict(batch)
    for k, v in {"input_ids": pad_id, **_SEQ_PAD}.items():
        if torch.is_tensor(batch.get(k)):
            out[k] = torch.nn.functional.pad(batch[k], (0, seq - s), value=v)
    return out


def _rows_like(batch: dict, rows: int, trainer: Trainer) -> list[dict]:
    """An expert micro-batch as micro-batches of exactly ``rows`` rows (PP: one activation
    shape per step): split by rows (with each row's media), the last one filled with empty
    rows (padding only, no labels)."""
    from mvlm.rl.media import join_media, split_media_rows

    n = batch["input_ids"].shape[0]
    if n == rows:
        return [batch]
    b0 = trainer.bundle
    media = split_media_rows(batch, b0.family, b0.hf_config) if b0.family.is_vlm else [{}] * n
    out = []
    for start in range(0, n, rows):
        idx = torch.arange(start, min(n, start + rows))
        extra = rows - len(idx)
        mb = {}
        for k in ("input_ids", "labels", "attention_mask", "position_ids"):
            v = batch.get(k)
            if v is None:
                continue
            dim = v.dim() - 2  # [b, s] or [3, b, s]
            part = v.index_select(dim, idx.to(v.device))
            if extra:
                shape = list(part.shape)
                shape[dim] = extra
                fill = trainer.pad_id if k == "input_ids" else _SEQ_PAD[k]
                part = torch.cat([part, torch.full(shape, fill, dtype=part.dtype,
                                                   device=part.device)], dim)
            mb[k] = part
        mb.update(join_media(media[start:start + rows], batch["input_ids"].device))
        out.append(mb)
    return out


class GRPOObjective(Objective):
    """GRPO-family training with on-the-fly rollouts (see the module docstring)."""

    name = "grpo"
    batch_keys: ClassVar[tuple[str, ...]] = ("input_ids", "position_ids", "attention_mask")

    def __init__(self, cfgs: GRPOConfigs, sampling: SamplingParams, num_iterations: int = 1,
                 reference: str = "auto", engine_seed: int = 0,
                 extra_rewards: tuple = (),
                 engine_factory: Callable[[Trainer], Any] | None = None) -> None:
        from mvlm.rl.rewards import build_rewards

        if num_iterations < 1:
            raise ValueError(f"--num_iterations {num_iterations} must be >= 1")
        if reference not in ("auto", "copy", "adapters"):
            raise ValueError(f"reference must be auto, copy or adapters, got {reference!r}")
        if cfgs.advantages.num_generations != sampling.num_generations:
            raise ValueError("advantage groups and rollout groups differ: build both from "
                             "--num_generations")
        self.cfgs, self.sampling, self.num_iterations = cfgs, sampling, num_iterations
        self.reference, self.engine_seed = reference, engine_seed
        # None: the built-in engine on the training model. Otherwise a callable that builds the
        # engine at set-up from the Trainer (e.g. a vLLM server client, :mod:`mvlm.rl.grpo_cli`);
        # an engine that needs the new policy weights before a rollout implements
        # ``before_rollout(trainer)``, called ahead of every generate.
        self.engine_factory = engine_factory
        self.rewards = build_rewards(cfgs.rewards, extra=extra_rewards)
        self.temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        lc = cfgs.loss
        self.needs_ref = lc.beta != 0.0
        loss_m = ["ratio/mean", "entropy"]
        loss_m += (["clip_ratio/cispo"] if lc.loss_type == "cispo" else [] if
                   lc.loss_type == "sapo" else
                   ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"])
        if self.needs_ref:
            loss_m.append("kl")
        if lc.rollout_importance_sampling_mode:
            loss_m += ["rollout_is/weight_mean", "rollout_is/clipped_frac"]
        if cfgs.chord.enabled:
            loss_m += ["chord/mu", "chord/sft_loss"]
        self.loss_metrics = tuple(loss_m)
        per_func = tuple(f"rewards/{n}/{s}" for n in self.rewards.names for s in ("mean", "std"))
        ds = (("dynamic_sample/dropped_groups", "dynamic_sample/zero_std_groups_used",
               "dynamic_sample/rollouts") if cfgs.dynamic_sample else ())
        self.step_metrics = STEP_METRICS + per_func + ds
        self.metrics = ("loss",) + self.loss_metrics + self.step_metrics
        self.ref: Any = None
        self.engine: Any = None
        self.tokenizer: Any = None
        self._buffer: list[dict] | None = None
        self._uses = 0
        self._prompt_ids: list[torch.Tensor] = []
        self._expert_data: Any = None
        self._expert_it: Any = None
        self._expert_epoch = 0

    # ---- set-up --------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        from mvlm.rl.rollout.builtin import (
            BuiltinRolloutEngine,
            eos_token_ids_from_hf_dir,
            media_placeholder_token_ids,
        )
        from mvlm.tuners.model import adapters

        if self.cfgs.chord.enabled and trainer.layout.cp > 1:
            raise ValueError("CHORD (--chord_sft_dataset) is not wired for context parallelism "
                             "(its expert micro-batch's SFT term would need the CP split of "
                             "its own labels): use --context_parallel_size 1 with CHORD")
        has_adapters = bool(adapters(trainer.bundle))
        mode = self.reference
        if mode == "auto":
            mode = "adapters" if has_adapters else "copy"
        if mode == "adapters" and not has_adapters:
            raise ValueError("the reference is the adapter-free policy, but the model has no "
                             "adapters: train with --train_type lora, or use a frozen copy")
        self.reference = mode
        if self.needs_ref and mode == "copy":
            self.ref = trainer.build_frozen_model()
        _, dp_rank, _ = _dp()
        src = trainer.src_dir
        if src is None:
            raise ValueError("GRPO needs the model's HF directory (stop tokens, tokenizer): build "
                             "the Trainer with src_dir")
        if self.engine_factory is not None:
            self.engine = self.engine_factory(trainer)
        else:
            self.engine = BuiltinRolloutEngine(trainer.bundle, eos_token_ids_from_hf_dir(src),
                                               pad_token_id=trainer.pad_id,
                                               seed=self.engine_seed * 1009 + dp_rank)
        suppress = tuple(media_placeholder_token_ids(trainer.bundle))
        if suppress:
            self.sampling.suppress_token_ids = tuple(self.sampling.suppress_token_ids) + suppress

    # ---- before each step ----------------------------------------------------------------------
    def model_output(self, model: Any, batch: dict) -> torch.Tensor:
        if "chord_tokens" in batch:  # CHORD's expert batch: the model's own (untempered) CE
            return model_forward(model, batch)
        return tempered_output(model, batch, self.temperature, entropy=True)

    def prepare_step(self, trainer: Trainer, batches: list[dict]) -> list[dict]:
        out = self._grpo_batches(trainer, batches)
        if trainer.ddp_models[0].training and self.cfgs.chord.enabled:
            out = self._with_chord(trainer, out)
        return out

    def _grpo_batches(self, trainer: Trainer, batches: list[dict]) -> list[dict]:
        training = trainer.ddp_models[0].training
        if training and self._buffer is not None and self._uses < self.num_iterations:
            self._check_repeated(batches)
            self._uses += 1
            reuse = [dict(b) for b in self._buffer]
            if "step_reports" in reuse[0]:  # describes the same rollout; no rollout time now
                r = reuse[0]["step_reports"].clone()
                for k in ("time/rollout_s", "time/logps_s"):
                    r[self.step_metrics.index(k)] = 0.0
                reuse[0]["step_reports"] = r
            return reuse
        out = self.rollout_batches(trainer, batches)
        if training:
            self._buffer, self._uses = out, 1
            if self.num_iterations > 1:
                self._repeat_prompts(trainer, batches)
        return out

    def _with_chord(self, trainer: Trainer, out: list[dict]) -> list[dict]:
        """CHORD: ``loss = (1 - mu) * L_GRPO + mu * L_SFT`` with ``mu`` on its schedule
        (:class:`mvlm.rl.chord.ChordConfig`, 0-based optimizer step). The GRPO micro-batches
        are scaled by ``1 - mu``; one expert micro-batch per DP rank
        (``--chord_sft_per_device_train_batch_size`` rows of ``--chord_sft_dataset``, encoded
        like SFT data) joins the step with ``mu`` x its share of the SFT token mean over the
        step's global expert-token count (:func:`mvlm.rl.chord.chord_sft_loss`). It reports 0
        units, so Megatron's division by the summed count (the GRPO completions) leaves both
        terms as they are. At ``mu == 0`` no expert batch is drawn."""
        from mvlm.train import steps

        mu = self.cfgs.chord.mu(trainer.step)
        out = [dict(b, chord_mu=mu) for b in out]
        if mu == 0.0:
            return out
        b = steps.to_device(self._next_expert(trainer), trainer.device)
        keys = ("input_ids", "labels", "position_ids", "attention_mask",
                *trainer.bundle.family.batch_keys)
        e = {k: b[k] for k in keys if b.get(k) is not None}
        n = torch.tensor([float((e["labels"] >= 0).sum())], dtype=torch.float64)
        dp_size, dp_rank, dp_group = _dp()
        if dp_size > 1:
            dist.all_reduce(n, group=dp_group)
        common = dict(chord_tokens=float(n[0]), chord_mu=mu, denoms=out[0]["denoms"])
        if trainer.layout.pp == 1:
            return out + [dict(e, **common, chord_report=1.0 if dp_rank == 0 else 0.0)]
        # pipeline stages exchange one activation shape per step: the expert rows go in
        # micro-batches of the GRPO rows' count, and every micro-batch is padded to one length
        experts = _rows_like(e, out[0]["input_ids"].shape[0], trainer)
        seq = max(b["input_ids"].shape[1] for b in out + experts)
        out = [_pad_seq(b, seq, trainer.pad_id) for b in out]
        return out + [dict(_pad_seq(x, seq, trainer.pad_id), **common,
                           chord_report=1.0 if dp_rank == 0 and i == 0 else 0.0)
                      for i, x in enumerate(experts)]

    def _next_expert(self, trainer: Trainer) -> dict:
        """The next expert micro-batch of this DP rank; the expert data is read once (after the
        Trainer attached its data: the same template and flags, task ``sft``) and cycled."""
        import dataclasses

        from mvlm.data.encode import build_dataloader, build_train_dataset

        cfg, ch = trainer.cfg, self.cfgs.chord
        dp_size, dp_rank, _ = _dp()
        if self._expert_data is None:
            dcfg = dataclasses.replace(
                cfg.data, dataset=list(ch.chord_sft_dataset), val_dataset=[],
                split_dataset_ratio=0.0, cached_dataset=None, task="sft", packing=False,
                streaming=False)
            self._expert_data = build_train_dataset(dcfg, str(trainer.src_dir), dp_rank=dp_rank,
                                                    dp_size=dp_size)
        for _ in range(2):
            if self._expert_it is None:
                self._expert_it = iter(build_dataloader(
                    self._expert_data, micro_batch_size=(ch.chord_sft_per_device_train_batch_size
                                                         or cfg.schedule.micro_batch_size),
                    dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed + self._expert_epoch,
                    shuffle=cfg.data.dataset_shuffle))
            try:
                return next(self._expert_it)
            except StopIteration:
                self._expert_it, self._expert_epoch = None, self._expert_epoch + 1
        raise ValueError(f"--chord_sft_dataset {ch.chord_sft_dataset}: no expert micro-batch "
                         "(the dataset is empty after encoding)")

    def _repeat_prompts(self, trainer: Trainer, batches: list[dict]) -> None:
        """TRL's ``RepeatSampler`` order: the k-1 steps that reuse a rollout see the same prompt
        micro-batches again (:meth:`Trainer.repeat_batches`), so the data advances by one global
        batch per rollout, not per optimizer step (no prompt is skipped)."""
        self._prompt_ids = [b["input_ids"] for b in batches]
        trainer.repeat_batches(batches, self.num_iterations - 1)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on exactly: the engine's call count (its per-call
        sampling seeds) and, mid-way through ``--num_iterations``, the rollout being reused."""
        mid = self._buffer is not None and self._uses < self.num_iterations
        return {"engine_calls": getattr(self.engine, "_calls", None),
                "buffer": self._buffer if mid else None, "uses": self._uses,
                "prompt_ids": self._prompt_ids if mid else []}

    def load_state_dict(self, trainer: Trainer, state: Any) -> None:
        from mvlm.train.steps import to_device

        if state.get("engine_calls") is not None and hasattr(self.engine, "_calls"):
            self.engine._calls = int(state["engine_calls"])
        if state.get("buffer") is not None:
            self._buffer = [to_device(b, trainer.device) for b in state["buffer"]]
            self._uses = int(state["uses"])
            self._prompt_ids = [t.to(trainer.device) for t in state["prompt_ids"]]

    def _check_repeated(self, batches: list[dict]) -> None:
        ids = [b["input_ids"] for b in batches]
        if len(ids) != len(self._prompt_ids) or not all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(ids, self._prompt_ids)):
            raise RuntimeError("--num_iterations: a step reusing a rollout got other prompts than "
                               "the rollout's; the data iterator was advanced by someone else")

    def _prompts(self, trainer: Trainer, batches: list[dict]) -> list[Any]:
        """One RolloutPrompt per row: its tokens (the attention mask's length) and its own
        media (the micro-batch's concatenated media split by rows, :mod:`mvlm.rl.media`)."""
        from mvlm.rl.media import split_media_rows
        from mvlm.rl.rollout.base import RolloutPrompt

        b0 = trainer.bundle
        prompts = []
        for b in batches:
            media = split_media_rows(b, b0.family, b0.hf_config)
            lens = b["attention_mask"].sum(-1).tolist()
            for row, n, m in zip(b["input_ids"].cpu(), lens, media):
                prompts.append(RolloutPrompt(input_ids=row[:int(n)].tolist(), media=m))
        return prompts

    def rollout_batches(self, trainer: Trainer, batches: list[dict]) -> list[dict]:
        """Roll out, score, build the training micro-batches (see the module docstring)."""
        t0 = time.time()
        prompts, groups, res, ds_metrics = self._collect(trainer, batches)
        t_roll = time.time() - t0
        per_mb = [len(b["input_ids"]) for b in batches]
        out = self._rows(trainer, prompts, groups, per_mb)
        t1 = time.time()
        old = self._logps(trainer, out, reference=False)
        ref = self._logps(trainer, out, reference=True) if self.needs_ref else None
        t_lp = time.time() - t1
        mism = self._mismatch(old, out)
        from mvlm.rl.grpo_loss import LossDenominators, check_logprob_mismatch

        check_logprob_mismatch({"token_mult_prob_error": mism[0], "logp_abs_diff_max": mism[1]},
                               self.cfgs.max_logprob_mismatch)
        comps = [c for g in groups for c in g.completions]
        adv, rmetrics = self._advantages(res, old, ref, out, len(comps))
        rmetrics.update(ds_metrics)
        dp_size, dp_rank, dp_group = _dp()
        denoms = LossDenominators.from_masks([b["completion_mask"] for b in out],
                                             group=dp_group if dp_size > 1 else None)
        start = 0
        for i, b in enumerate(out):
            n = len(b["input_ids"])
            b["advantages"] = adv[start:start + n].to(b["input_ids"].device)
            start += n
            b["denoms"] = denoms
            if old and self.num_iterations > 1:
                b["old_logps"] = old[i]
            if ref:
                b["ref_logps"] = ref[i]
        lengths = torch.tensor([len(c.token_ids) for c in comps], dtype=torch.float64)
        clipped = torch.tensor([c.stop_reason == "length" for c in comps], dtype=torch.float64)
        lengths_all = _all_gather_rows(lengths, dp_group, dp_size)
        clipped_all = _all_gather_rows(clipped, dp_group, dp_size)
        vals = {"completions/mean_length": float(lengths_all.mean()),
                "completions/min_length": float(lengths_all.min()),
                "completions/max_length": float(lengths_all.max()),
                "completions/clipped_ratio": float(clipped_all.mean()),
                "token_mult_prob_error": mism[0], "logp_abs_diff_max": mism[1],
                "time/rollout_s": t_roll, "time/logps_s": t_lp, **rmetrics}
        if dp_rank == 0:  # reported once per step: DP rank 0's first micro-batch
            out[0]["step_reports"] = torch.tensor([vals[k] for k in self.step_metrics],
                                                  dtype=torch.float64)
        return out

    def _rows(self, trainer: Trainer, prompts: list[Any], groups: list[RolloutGroup],
              per_mb: list[int]) -> list[dict]:
        """Prompt + completion rows, ``num_generations`` per prompt, in micro-batches of the
        loader's prompts x the group size, all padded to one length (PP needs one)."""
        from mvlm.rl.rollout.builtin import sequence_positions

        k = self.sampling.num_generations
        from mvlm.rl.media import join_media

        rows = []
        for g in groups:
            pr = prompts[g.prompt_index]
            for c in g.completions:
                rows.append((list(pr.input_ids), c, pr.media))
        seq = max(len(p) + len(c.token_ids) for p, c, _ in rows)
        mult = trainer.layout.tp if trainer.cfg.parallel.sequence_parallel else 1
        if trainer.layout.cp > 1:  # the zigzag split: 2 x CP chunks
            mult *= 2 * trainer.layout.cp
        seq = -(-seq // mult) * mult
        pad = int(trainer.pad_id if trainer.pad_id is not None else self.engine.pad_token_id)
        dev = trainer.device
        out, start = [], 0
        for n_prompts in per_mb:
            chunk = rows[start:start + n_prompts * k]
            start += n_prompts * k
            b = len(chunk)
            ids = torch.full((b, seq), pad, dtype=torch.long)
            labels = torch.full((b, seq), -100, dtype=torch.long)
            pos = torch.zeros((3, b, seq), dtype=torch.long)
            att = torch.zeros((b, seq), dtype=torch.bool)
            roll = torch.zeros((b, seq), dtype=torch.float32)
            trunc = torch.zeros(b, dtype=torch.bool)
            for i, (p, c, _) in enumerate(chunk):
                full = p + list(c.token_ids)
                n, P, T = len(full), len(p), len(c.token_ids)
                ids[i, :n] = torch.tensor(full)
                labels[i, P - 1:P - 1 + T] = torch.tensor(c.token_ids)
                # the prompt's media: the family's (mRoPE) positions of the whole row
                pos[:, i, :n] = sequence_positions(trainer.bundle.hf_config, full, chunk[i][2])
                att[i, :n] = True
                roll[i, P - 1:P - 1 + T] = torch.tensor(c.logprobs)
                trunc[i] = c.stop_reason == "length"
            mask = (labels >= 0).float()
            if self.cfgs.overlong_filter:
                from mvlm.rl.advantages import overlong_filter

                mask = overlong_filter(mask, trunc)[0]
            mb = {k2: v.to(dev) for k2, v in {
                "input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": att,
                "rollout_logps": roll, "completion_mask": mask}.items()}
            # each row carries its prompt's images (repeated per completion); a micro-batch
            # without any has no media keys, and model_forward keeps the tower in the graph
            mb.update(join_media([r[2] for r in chunk], dev))
            out.append(mb)
        return out

    def _logps_step(self, store: list):
        def step(data_iterator, model):
            batch = next(data_iterator)
            out = tempered_output(model, batch, self.temperature)
            if not unwrap(model).post_process:
                return out, None
            store.append(cp_full_sequence(token_logps(out).detach().float()))

            def no_loss(o):
                return o.sum() * 0, torch.tensor(1, dtype=torch.int), {}

            return out, no_loss

        return step

    def _logps(self, trainer: Trainer, batches: list[dict], reference: bool) -> list:
        """Per-token log-probs of each micro-batch under the current policy (``reference``:
        the reference model), no grad, eval mode; [] off the last pipeline stage."""
        from mvlm.train.objectives.dpo import adapters_off, eval_mode

        store: list = []
        step = self._logps_step(store)
        if reference and self.reference == "copy":
            trainer.forward_only(self.ref.models, batches, step)
            return store
        models = trainer.ddp_models
        ctx = adapters_off(trainer.bundle) if reference else contextlib.nullcontext()
        with ctx, eval_mode(models):
            trainer.forward_only(models, batches, step)
        return store

    def _mismatch(self, old: list, batches: list[dict]) -> tuple[float, float]:
        """(mean exp|dlogp|, max |dlogp|) engine vs trainer over the step's completion tokens of
        every DP rank, the same number on every rank (the last stage computes it)."""
        dp_size, _, dp_group = _dp()
        t = torch.zeros(3, dtype=torch.float64)
        for lp, b in zip(old, batches):
            m = b["labels"] >= 0
            d = (lp.double() - b["rollout_logps"].double()).abs()[m].cpu()
            t[0] += d.exp().sum()
            t[1] += d.numel()
            t[2] = max(float(t[2]), float(d.max()) if d.numel() else 0.0)
        s = t[:2].clone()
        if dp_size > 1:
            dist.all_reduce(s, group=dp_group)
        mx = torch.tensor([float(s[0] / s[1]) if s[1] > 0 else 0.0, float(t[2])],
                          dtype=torch.float64)
        if dp_size > 1:
            m2 = torch.tensor([float(t[2])], dtype=torch.float64)
            dist.all_reduce(m2, op=dist.ReduceOp.MAX, group=dp_group)
            mx[1] = m2[0]
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)  # off the last stage both are 0
        return float(mx[0]), float(mx[1])

    def _score(self, trainer: Trainer, comps: list, rows: list[dict],
               prompts: list | None = None) -> Any:
        """Rewards of this rank's completions (``rows``: each completion's dataset columns, e.g.
        ``solution``, passed to the reward functions as keyword arguments)."""
        if self.tokenizer is None:  # set-up runs before the Trainer attaches its data
            self.tokenizer = trainer.data.template.tokenizer
        texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in comps]
        return self.rewards(texts, rows, response_token_ids=[c.token_ids for c in comps],
                            trainer_state={"global_step": trainer.step},
                            prompt_token_ids=None if prompts is None else
                            [list(p.input_ids) for p in prompts],
                            prompt_media=None if prompts is None else [p.media for p in prompts])

    def _rollout_once(self, trainer: Trainer, batches: list[dict]) -> tuple[list, list, Any]:
        """Prompts of the micro-batches, their rollout groups, and the completions' rewards."""
        prompts = self._prompts(trainer, batches)
        before = getattr(self.engine, "before_rollout", None)
        if before is not None:  # e.g. push the policy's weights to a vLLM server
            before(trainer)
        groups = self.engine.generate(prompts, self.sampling)
        comps = [c for g in groups for c in g.completions]
        extra = [r for b in batches for r in (b.get("extra") or [{}] * len(b["input_ids"]))]
        rows = [extra[g.prompt_index] for g in groups for _ in g.completions]
        return prompts, groups, self._score(trainer, comps, rows, [
            prompts[g.prompt_index] for g in groups for _ in g.completions])

    def _collect(self, trainer: Trainer, batches: list[dict]) -> tuple[list, list, Any, dict]:
        """One rollout of the step's prompts; with ``--dynamic_sample`` (DAPO) also up to
        ``--max_resample_times`` rollouts of further prompt batches from the loader, keeping the
        groups whose rewards differ (:class:`mvlm.rl.advantages.DynamicSampleBuffer`) until the
        step's group count is reached, topped up with zero-std groups when the retries run out.
        Every rank rolls out as long as any rank still needs groups (one decision, all-reduced),
        and fills its own share of the step."""
        from mvlm.rl.advantages import DynamicSampleBuffer
        from mvlm.rl.rollout.base import RolloutGroup

        prompts, groups, res = self._rollout_once(trainer, batches)
        # evaluation scores its own prompts as they come (more would come from the train loader)
        if not self.cfgs.dynamic_sample:
            return prompts, groups, res, {}
        if not trainer.ddp_models[0].training:
            return prompts, groups, res, {"dynamic_sample/dropped_groups": 0.0,
                                          "dynamic_sample/zero_std_groups_used": 0.0,
                                          "dynamic_sample/rollouts": 1.0}
        k = self.sampling.num_generations
        buf = DynamicSampleBuffer(target_groups=len(groups), num_generations=k,
                                  max_resample_times=self.cfgs.max_resample_times)
        while True:
            rpf = res.rewards_per_func
            buf.add(res.weighted(), [(prompts[g.prompt_index], g, rpf[i * k:(i + 1) * k])
                                     for i, g in enumerate(groups)])
            more = torch.tensor([float(buf.need_more)])
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not bool(more[0]):
                break
            prompts, groups, res = self._rollout_once(trainer, trainer.next_batches())
        kept, stats = buf.take()
        prompts = [p for p, _, _ in kept]
        groups = []
        for i, (_, g, _) in enumerate(kept):
            for c in g.completions:
                c.prompt_index = i
            groups.append(RolloutGroup(i, list(g.completions)))
        res = type(res)(torch.cat([r for _, _, r in kept]), res.names, res.weights, res.skipped)
        counts = torch.tensor([stats["dynamic_sample/dropped_groups"],
                               stats["dynamic_sample/zero_std_groups_used"]], dtype=torch.float64)
        dp_size, _, dp_group = _dp()
        if dp_size > 1:
            dist.all_reduce(counts, group=dp_group)
        return prompts, groups, res, {"dynamic_sample/dropped_groups": float(counts[0]),
                                      "dynamic_sample/zero_std_groups_used": float(counts[1]),
                                      "dynamic_sample/rollouts": float(stats[
                                          "dynamic_sample/rollouts"])}

    def _advantages(self, res: Any, old: list, ref: list | None, batches: list[dict], n: int
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's advantages (from the rewards ``res`` of every DP rank) and the reward
        metrics; ``n`` = this rank's completions."""
        from mvlm.rl.advantages import compute_advantages

        dp_size, dp_rank, dp_group = _dp()
        rpf = _all_gather_rows(res.rewards_per_func.to(torch.float32), dp_group, dp_size)
        cfg = self.cfgs.advantages
        kl = None
        if cfg.kl_enters_reward:
            kl = self._sequence_kl(old, ref, batches, n)
            kl = _all_gather_rows(kl, dp_group, dp_size)
        full = type(res)(rpf, res.names, res.weights, res.skipped)
        a = compute_advantages(full.weighted(), cfg, kl)
        metrics = {k: v for k, v in full.metrics().items() if not k.endswith("/skipped")}
        metrics["frac_reward_zero_std"] = a.frac_reward_zero_std
        return a.advantages[dp_rank * n:(dp_rank + 1) * n], metrics

    def _sequence_kl(self, old: list, ref: list | None, batches: list[dict], n: int
                     ) -> torch.Tensor:
        """Per-completion KL(old || ref) for ``--kl_in_reward``, from the last stage to all."""
        from megatron.core import parallel_state

        from mvlm.rl.advantages import sequence_kl_for_reward

        kl = torch.zeros(n, dtype=torch.float32)
        if old:
            kl = torch.cat([sequence_kl_for_reward(o, r, b["completion_mask"]).cpu()
                            for o, r, b in zip(old, ref, batches)]).float()
        dist.broadcast(kl, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return kl

    # ---- the loss ------------------------------------------------------------------------------
    def loss(self, batch: dict, output: torch.Tensor) -> LossOutput:
        from mvlm.rl.grpo_loss import grpo_loss

        if "chord_tokens" in batch:
            return self._chord_loss(batch, output)
        lc = self.cfgs.loss
        # under CP every CP rank computes the loss on the whole sequences (see the module
        # docstring); its count (rows) is then summed over CP too, which cancels the CP-fold sum
        # of the gathered log-probs' gradients
        lp = cp_full_sequence(token_logps(output).float())
        is_mode = lc.rollout_importance_sampling_mode is not None
        res = grpo_loss(lp, batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"],
                        batch["completion_mask"], lc, batch["denoms"],
                        # the engine's tempered full-vocabulary log-probs: the weight corrects
                        # the engine/trainer mismatch, not top-k/top-p truncation (whose
                        # processed log-probs would scale every weight down by the kept mass)
                        rollout_logps=batch["rollout_logps"] if is_mode else None,
                        entropies=batch.get("entropies"))
        n_seq = batch["denoms"].num_sequences
        rows = batch["input_ids"].shape[0]
        mu = batch.get("chord_mu", 0.0)
        loss_sum = res.loss * (1.0 - mu) * n_seq
        count = torch.tensor(rows, dtype=torch.int, device=loss_sum.device)
        reports = {"loss": torch.stack([loss_sum.detach().double(),
                                        torch.tensor(float(rows), dtype=torch.float64,
                                                     device=loss_sum.device)])}
        zero = torch.zeros(2, dtype=torch.float64)
        for k in self.loss_metrics:
            reports[k] = res.sums.get(k, zero)
        step = batch.get("step_reports")
        if self.cfgs.chord.enabled and step is not None:
            reports["chord/mu"] = torch.tensor([mu, 1.0], dtype=torch.float64)
        for i, k in enumerate(self.step_metrics):
            reports[k] = zero if step is None else torch.stack(
                [step[i], torch.tensor(1.0, dtype=torch.float64)])
        return loss_sum, count, reports


    def _chord_loss(self, batch: dict, output: torch.Tensor) -> LossOutput:
        """The expert micro-batch's term: ``mu`` x its share of the SFT token mean, in the GRPO
        batches' unit (x the step's completions), counting 0 units (see :meth:`_with_chord`)."""
        from mvlm.rl.chord import chord_sft_loss

        ch = self.cfgs.chord
        sft = chord_sft_loss(token_logps(output).float(), batch["labels"] >= 0,
                             batch["chord_tokens"], ch.chord_enable_phi_function)
        loss_sum = batch["chord_mu"] * sft * batch["denoms"].num_sequences
        zero = torch.zeros(2, dtype=torch.float64)
        reports = {k: zero for k in self.metrics}
        reports["loss"] = torch.stack([loss_sum.detach().double(), zero[0]])
        reports["chord/sft_loss"] = torch.tensor([float(sft), batch["chord_report"]],
                                                 dtype=torch.float64)
        return loss_sum, torch.tensor(0, dtype=torch.int, device=loss_sum.device), reports
