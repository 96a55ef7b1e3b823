"""`mvlm rollout`: a vLLM rollout server for GRPO (ms-swift's ``swift rollout``).

Runs in vLLM's own Python environment (vLLM pins its own torch; see
``scripts/setup_vllm_cpu_venv.sh`` and ``docs/rollout.md``), so this module imports only the
standard library, torch, safetensors, vLLM (lazily, in the engine processes) and the Megatron-free
:mod:`mvlm.rl.rollout.wire`. The trainer talks to it through
:class:`mvlm.rl.rollout.vllm_server.VLLMServerEngine`.

Shape of the server
-------------------
* ``--vllm_data_parallel_size D`` engine processes, each one ``vllm.LLM`` over
  ``--tensor_parallel_size T`` workers. The HTTP front (stdlib ``ThreadingHTTPServer``, one
  request at a time under a lock: generation and weight updates must not interleave) splits a
  generate request's prompts over the D engines and sends every weight bucket to all of them.
* Generation takes prompts as token ids and returns, per completion, the token ids, the two
  per-token log-probabilities of :mod:`mvlm.rl.rollout.base` and the stop reason.
* A weight update is ``begin`` (a manifest: every HF tensor's name, shape, dtype; it must equal
  the served checkpoint's tensor list), ``bucket`` x k (safetensors bodies; each tensor is checked
  against the manifest, must arrive once, and is handed to vLLM's layer-wise in-place reload as it
  arrives: a layer is re-processed, e.g. repacked for the CPU GEMM kernels, once all its tensors
  are in, so the server holds about one bucket, never the model), ``finish`` (every manifest
  tensor arrived: the reload is closed, the weight version goes up and the prefix cache is reset,
  since cached K/V of the old weights would otherwise be reused). A sync that fails half-way
  leaves the engines with mixed weights: they are then marked stale and refuse to generate until
  a complete sync; so does any generate request while a sync is open.
* ``/weights/read`` returns named HF tensors read back from engine 0 (un-fused from vLLM's packed
  qkv / gate-up parameters; linear weights read through the layer's own kernel, because the CPU
  backend drops the plain weight after repacking it); ``/weights/digest`` returns their sha256
  only, for ``--check_weight_sync``.
* SIGTERM / SIGINT: stop accepting requests, close the engines, exit 0.

Log-probabilities: the engines run with ``logprobs_mode="processed_logprobs"`` so vLLM returns
the log-prob of each sampled token under the distribution it was drawn from
(``sampling_logprobs``). The trainer-view ``logprobs`` (temperature-scaled, before repetition
penalty / top-k / top-p / suppression) are the same numbers when none of those is active; when one
is, the engine re-scores prompt + completion in one prefill pass (vLLM's ``prompt_logprobs``,
which are never temperature-scaled), exact at temperature 1 and for greedy decoding; any other
temperature combined with a filter is refused with the reason.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

log = logging.getLogger("mvlm.rollout")


# ----------------------------------------------------------------------------------- flags --
def add_rollout_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """ms-swift's ``swift rollout`` flag names (vLLM engine flags carry the ``vllm_`` prefix)."""
    p.add_argument("--model", required=True,
                   help="Hugging Face checkpoint directory to serve (a text model on CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--vllm_data_parallel_size", type=int, default=1,
                   help="number of independent vLLM engines; prompts are split over them")
    p.add_argument("--tensor_parallel_size", "--vllm_tensor_parallel_size", type=int, default=1,
                   dest="tensor_parallel_size", help="vLLM tensor parallel size of each engine")
    p.add_argument("--vllm_gpu_memory_utilization", type=float, default=None,
                   help="fraction of device memory (on CPU: of host RAM, for the KV cache) per "
                        "engine; default 0.9 on GPU, 0.1 on CPU")
    p.add_argument("--torch_dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="engine dtype (auto: vLLM's choice; on CPU it runs fp32 checkpoints in "
                        "bfloat16, so pass float32 to match an fp32 trainer)")
    p.add_argument("--vllm_max_model_len", type=int, default=None,
                   help="longest prompt + completion (default: the model's)")
    p.add_argument("--vllm_enforce_eager", type=_bool, default=True,
                   help="no CUDA graphs / compilation (faster start-up; default true)")
    p.add_argument("--vllm_enable_prefix_caching", type=_bool, default=True,
                   help="reuse K/V of shared prompt prefixes (reset after every weight sync)")
    p.add_argument("--vllm_max_num_seqs", type=int, default=256,
                   help="most sequences an engine decodes at once")
    p.add_argument("--seed", type=int, default=42, help="engine seed")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning"])
    return p


def _bool(v: str) -> bool:
    s = str(v).lower()
    if s in ("1", "true", "yes"):
        return True
    if s in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    return add_rollout_args(argparse.ArgumentParser(
        prog="mvlm rollout", description="vLLM rollout server for GRPO (swift rollout)"))


@dataclass
class RolloutServerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    vllm_data_parallel_size: int = 1
    tensor_parallel_size: int = 1
    vllm_gpu_memory_utilization: float | None = None
    vllm_max_model_len: int | None = None
    torch_dtype: str = "auto"
    vllm_enforce_eager: bool = True
    vllm_enable_prefix_caching: bool = True
    vllm_max_num_seqs: int = 256
    seed: int = 42
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise FileNotFoundError(f"--model {self.model}: not a directory (a Hugging Face "
                                    "checkpoint directory is needed)")
        if self.vllm_data_parallel_size < 1:
            raise ValueError(f"--vllm_data_parallel_size must be >= 1, got "
                             f"{self.vllm_data_parallel_size}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size}")
        u = self.vllm_gpu_memory_utilization
        if u is not None and not 0.0 < u <= 1.0:
            raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1], got {u}")


# --------------------------------------------------------------------- engine side (vLLM) --
def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def _llm_kwargs(cfg: RolloutServerConfig) -> dict:
    util = cfg.vllm_gpu_memory_utilization
    if util is None:
        # On CPU vLLM reads this as the fraction of host RAM for the KV cache; its GPU default
        # (0.9) cannot be reserved beside a trainer and fails at start-up.
        util = 0.1 if _on_cpu() else 0.9
    kw = dict(model=cfg.model, tensor_parallel_size=cfg.tensor_parallel_size,
              gpu_memory_utilization=util, enforce_eager=cfg.vllm_enforce_eager,
              enable_prefix_caching=cfg.vllm_enable_prefix_caching, seed=cfg.seed,
              max_num_seqs=cfg.vllm_max_num_seqs, logprobs_mode="processed_logprobs",
              max_logprobs=0, dtype=cfg.torch_dtype)
    if cfg.vllm_max_model_len is not None:
        kw["max_model_len"] = cfg.vllm_max_model_len
    return kw


def _model(worker):
    return worker.model_runner.get_model()


def _sync_begin_rpc(worker):
    """On every vLLM worker: start vLLM's layer-wise in-place reload. Each layer is processed
    (e.g. repacked for the CPU GEMM kernels, which drop the plain weight) as soon as all of its
    tensors have arrived, whichever bucket they come in; layers never sent keep their weights."""
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    initialize_layerwise_reload(_model(worker))


def _load_weights_rpc(worker, tensors):
    """On every vLLM worker: (HF name, tensor) pairs through the model's own loader (it knows
    the fused qkv / gate-up layouts and this rank's tensor-parallel shard)."""
    _model(worker).load_weights(weights=list(tensors))
    return len(tensors)


def _sync_finish_rpc(worker):
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    model = _model(worker)
    finalize_layerwise_reload(model, worker.model_runner.model_config)
    _reprocess_tied_lm_head(model)


def _reprocess_tied_lm_head(model) -> None:
    """A tied ``lm_head`` shares ``embed_tokens``' weight but receives no tensor of its own in a
    sync, so the layer-wise reload never re-processes it: on CPU its GEMM kernel keeps the
    packed copy of the *old* embeddings made at start-up, and the logits would come from the old
    output layer while every hidden state uses the new weights (found in GRPO, where the tied
    embeddings train: engine vs trainer log-probs drifted apart step by step). Re-run the
    layer's post-load processing on the shared, already updated weight."""
    lm = getattr(model, "lm_head", None)
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    w = getattr(lm, "weight", None)
    if w is None or emb is None or w is not getattr(emb, "weight", None):
        return
    qm = getattr(lm, "quant_method", None)
    if qm is not None and hasattr(qm, "process_weights_after_loading"):
        qm.process_weights_after_loading(lm)


def _packed_source(model, hf_name: str):
    """(module, parameter name, rows or None) holding an HF tensor in vLLM's model: the model's
    ``packed_modules_mapping`` maps q/k/v_proj to qkv_proj and gate/up_proj to gate_up_proj;
    ``rows`` are the part's output rows on this TP rank."""
    modules = dict(model.named_modules())
    mod_name, _, pname = hf_name.rpartition(".")
    if mod_name in modules and hasattr(modules[mod_name], pname):
        return modules[mod_name], pname, None
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    head, _, leaf = mod_name.rpartition(".")
    for fused, parts in packed.items():
        if leaf in parts:
            fmod = modules.get(f"{head}.{fused}" if head else fused)
            if fmod is None:
                continue
            sizes = _local_output_sizes(fmod)
            i = parts.index(leaf)
            return fmod, pname, (sum(sizes[:i]), sum(sizes[:i + 1]))
    return None


def _local_output_sizes(mod) -> list[int]:
    """Per-part output rows of a fused linear on this TP rank."""
    if hasattr(mod, "num_kv_heads") and hasattr(mod, "head_size"):  # QKVParallelLinear
        q = mod.num_heads * mod.head_size
        kv = mod.num_kv_heads * mod.head_size
        return [q, kv, kv]
    tp = int(getattr(mod, "tp_size", 1) or 1)
    return [s // tp for s in mod.output_sizes]


def _kernel_weight(mod, chunk: int = 1024):
    """A linear layer's [out, in] weight on this rank *as its kernel computes with it*: the
    layer applied (without bias) to rows of the identity. Needed on CPU, where vLLM repacks the
    weight for oneDNN / its GEMM kernels and drops the plain parameter; exact (each output is one
    product with 1.0, the other terms are exact zeros)."""
    import torch

    w = getattr(mod, "weight", None)
    qm = getattr(mod, "quant_method", None)
    if w is not None and w.numel() > 0 and not hasattr(mod, "cpu_linear"):
        return w.detach()
    k = int(mod.input_size_per_partition)
    dtype = mod.params_dtype
    cols = []
    for i in range(0, k, chunk):
        n = min(chunk, k - i)
        x = torch.zeros((n, k), dtype=dtype, device=w.device if w is not None else "cpu")
        x[torch.arange(n), torch.arange(i, i + n)] = 1
        cols.append(qm.apply(mod, x, bias=None).float())
    return torch.cat(cols, 0).t().contiguous().to(dtype)


def _read_weights_rpc(worker, names):
    """On every vLLM worker: this rank's piece of each named HF tensor and the dim it is split
    along over TP (None: replicated), or None if the model has no such tensor."""
    import torch

    model = _model(worker)
    out = {}
    with torch.no_grad():
        for n in names:
            src = _packed_source(model, n)
            if src is None:
                out[n] = None
                continue
            mod, pname, rows = src
            if pname == "weight" and hasattr(mod, "input_size_per_partition"):
                t = _kernel_weight(mod)
            else:
                t = getattr(mod, pname).detach()
            if rows is not None:
                t = t.narrow(0, rows[0], rows[1] - rows[0])
            out[n] = (t.to("cpu").clone(), _tp_split_dim(mod, pname))
    return out


def _tp_split_dim(mod, pname: str) -> int | None:
    """Along which dim this parameter is sharded over the engine's TP ranks (None: whole)."""
    if int(getattr(mod, "tp_size", 1) or 1) == 1:
        return None
    cls = type(mod).__name__
    if "RowParallel" in cls:
        return 1 if pname == "weight" else None
    if "ColumnParallel" in cls or "QKVParallel" in cls or "VocabParallel" in cls \
            or "ParallelLMHead" in cls:
        return 0
    return None


class _Engine:
    """One ``vllm.LLM`` in this process (the body of an engine process)."""

    def __init__(self, cfg: RolloutServerConfig, index: int) -> None:
        # Engine core in this process: collective_rpc then calls our functions on the worker
        # directly (TP 1) or through vLLM's own executor (TP > 1).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm import LLM

        kw = _llm_kwargs(cfg)
        kw["seed"] = cfg.seed + index
        self.llm = LLM(**kw)
        self.vocab = self.llm.llm_engine.model_config.get_vocab_size()
        # One token now: a model the backend cannot run (e.g. a head size vLLM's CPU attention
        # lacks) fails at start-up with vLLM's reason, not on the trainer's first request.
        from vllm import SamplingParams, TokensPrompt

        self.llm.generate([TokensPrompt(prompt_token_ids=[0])],
                          SamplingParams(max_tokens=1, temperature=0.0, detokenize=False),
                          use_tqdm=False)

    def generate(self, prompts: list[list[int]], sampling: dict) -> list[list[dict]]:
        from vllm import SamplingParams, TokensPrompt

        temp = float(sampling["temperature"])
        greedy = temp == 0.0
        top_k = int(sampling.get("top_k", -1))
        suppress = [int(t) for t in sampling.get("suppress_token_ids", ())]
        rep = float(sampling.get("repetition_penalty", 1.0))
        top_p = float(sampling.get("top_p", 1.0))
        filters = (rep != 1.0 or bool(suppress)
                   or (not greedy and (top_p < 1.0 or 0 < top_k < self.vocab)))
        if filters and temp not in (0.0, 1.0):
            raise ValueError(
                f"--temperature {temp:g} together with --top_k/--top_p/--repetition_penalty or "
                "suppressed tokens: vLLM then returns only the filtered distribution's log-probs"
                " and scores prompts without temperature, so the trainer-view log-probs (and "
                "the engine/trainer mismatch) cannot be measured exactly. Use --temperature 1 "
                "with those filters, or no filter at this temperature")
        kw = dict(n=int(sampling["num_generations"]),
                  max_tokens=int(sampling["max_completion_length"]),
                  temperature=temp, top_p=1.0 if greedy else top_p,
                  top_k=0 if (greedy or top_k < 1) else top_k, repetition_penalty=rep,
                  seed=sampling.get("seed"), logprobs=0, detokenize=False)
        if suppress:
            kw["allowed_token_ids"] = [i for i in range(self.vocab) if i not in set(suppress)]
        params = SamplingParams(**kw)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                 params, use_tqdm=False)
        groups = []
        for o in outs:
            comps = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for d, t in zip(c.logprobs, ids)]
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a completion with {c.finish_reason!r}")
                comps.append({"token_ids": ids, "processed": lps,
                              "stop_reason": "eos" if c.finish_reason == "stop" else "length"})
            groups.append(comps)
        rescored = None
        if filters:
            rescored = iter(self._trainer_view_logprobs(
                [(p, c["token_ids"]) for p, comps in zip(prompts, groups) for c in comps]))
        for comps in groups:
            for c in comps:
                processed = c.pop("processed")
                # processed == log_softmax(logits / T) when no filter is active (T = 1 greedy)
                c["logprobs"] = next(rescored) if filters else processed
                # an argmax is drawn with probability one (see mvlm.rl.rollout.base)
                c["sampling_logprobs"] = [0.0] * len(processed) if greedy else processed
        return groups

    def _trainer_view_logprobs(self, seqs: list[tuple[list[int], list[int]]]
                               ) -> list[list[float]]:
        """log_softmax(logits) at each completion token, from one prefill of prompt +
        completion (vLLM's prompt log-probs: raw logits, no temperature, no filter). Exact for
        the trainer view at temperature 1 (and greedy); the caller refuses other temperatures
        with filters."""
        from vllm import SamplingParams, TokensPrompt

        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        todo = [(i, p, c) for i, (p, c) in enumerate(seqs) if c]
        res: list[list[float]] = [[] for _ in seqs]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p) + list(c))
                                  for _, p, c in todo], sp, use_tqdm=False)
        for (i, p, c), o in zip(todo, outs):
            plp = o.prompt_logprobs[len(p):]
            res[i] = [float(d[t].logprob) for d, t in zip(plp, c)]
        return res

    def sync_begin(self) -> None:
        self.llm.collective_rpc(_sync_begin_rpc)

    def load(self, tensors: list) -> int:
        self.llm.collective_rpc(_load_weights_rpc, args=(tensors,))
        return len(tensors)

    def sync_finish(self) -> None:
        self.llm.collective_rpc(_sync_finish_rpc)

    def read(self, names: list[str]) -> dict:
        import torch

        per_rank = self.llm.collective_rpc(_read_weights_rpc, args=(list(names),))
        out = {}
        for n in names:
            pieces = [r[n] for r in per_rank]
            if any(p is None for p in pieces):
                raise KeyError(f"{n}: no parameter of the served model holds this HF tensor")
            split = pieces[0][1]
            out[n] = (pieces[0][0] if split is None
                      else torch.cat([p[0] for p in pieces], dim=split))
        return out

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


def _engine_main(conn, cfg: RolloutServerConfig, index: int) -> None:
    """Engine process: build the engine, then answer (op, payload) messages until "close"."""
    logging.basicConfig(level=cfg.log_level.upper(),
                        format=f"[%(asctime)s engine{index}] %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front process decides when to stop
    try:
        eng = _Engine(cfg, index)
    except BaseException as e:  # report start-up failure to the front instead of dying mute
        conn.send(("error", f"engine {index} failed to start: {e!r}\n{traceback.format_exc()}"))
        return
    conn.send(("ready", str(eng.llm.llm_engine.model_config.dtype).removeprefix("torch.")))
    while True:
        try:
            op, payload = conn.recv()
        except EOFError:
            return
        if op == "close":
            conn.send(("ok", None))
            return
        try:
            if op == "generate":
                res = eng.generate(*payload)
            elif op == "load":
                res = eng.load(payload)
            elif op == "sync_begin":
                res = eng.sync_begin()
            elif op == "sync_finish":
                res = eng.sync_finish()
            elif op == "read":
                res = eng.read(payload)
            elif op == "reset_prefix_cache":
                res = eng.reset_prefix_cache()
            else:
                raise ValueError(f"unknown engine op {op!r}")
            conn.send(("ok", res))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


class EngineError(RuntimeError):
    """An engine process reported an error or died."""


class EnginePool:
    """``vllm_data_parallel_size`` engine processes, driven from the HTTP front."""

    def __init__(self, cfg: RolloutServerConfig) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # vLLM and torch threads do not survive fork
        self.conns, self.procs = [], []
        for i in range(cfg.vllm_data_parallel_size):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_engine_main, args=(b, cfg, i), daemon=False,
                            name=f"mvlm-rollout-engine{i}")
            p.start()
            self.conns.append(a)
            self.procs.append(p)
        self.dtypes = []
        for i, c in enumerate(self.conns):
            status, msg = self._recv(i, c)
            if status != "ready":
                self.close()
                raise EngineError(msg)
            self.dtypes.append(msg)

    def _recv(self, i, c):
        while not c.poll(1.0):
            if not self.procs[i].is_alive():
                raise EngineError(f"engine {i} exited with code {self.procs[i].exitcode}")
        try:
            return c.recv()
        except EOFError as e:
            raise EngineError(f"engine {i} closed its pipe") from e

    def _call(self, items: list[tuple[int, str, object]]) -> list:
        for i, op, payload in items:
            self.conns[i].send((op, payload))
        out = []
        errors = []
        for i, _, _ in items:
            status, res = self._recv(i, self.conns[i])
            if status == "error":
                errors.append(f"engine {i}: {res}")
            out.append(res)
        if errors:
            raise EngineError("; ".join(errors))
        return out

    def generate(self, prompts: list[list[int]], sampling: dict) -> list[list[dict]]:
        d = len(self.conns)
        per = -(-len(prompts) // d)
        chunks = [(i, prompts[i * per:(i + 1) * per]) for i in range(d)]
        chunks = [(i, c) for i, c in chunks if c]
        res = self._call([(i, "generate", (c, sampling)) for i, c in chunks])
        return [g for part in res for g in part]

    def sync_begin(self) -> None:
        self._call([(i, "sync_begin", None) for i in range(len(self.conns))])

    def load(self, tensors: list) -> None:
        self._call([(i, "load", tensors) for i in range(len(self.conns))])

    def sync_finish(self) -> None:
        self._call([(i, "sync_finish", None) for i in range(len(self.conns))])

    def read(self, names: list[str]) -> dict:
        return self._call([(0, "read", names)])[0]

    def reset_prefix_cache(self) -> None:
        self._call([(i, "reset_prefix_cache", None) for i in range(len(self.conns))])

    def close(self, timeout: float = 60.0) -> None:
        for c in self.conns:
            try:
                c.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(10)


# ----------------------------------------------------------------------------- HTTP front --
class SyncError(ValueError):
    """A weight update that does not match its manifest (names the tensor)."""


@dataclass
class _Sync:
    sync_id: str
    manifest: dict
    received: set
    started: float
    nbytes: int = 0
    buckets: int = 0


def wire_dtype(d) -> str | None:
    return None if d is None else str(d).removeprefix("torch.")


class RolloutService:
    """Request handling, independent of HTTP (the handler only decodes and encodes)."""

    def __init__(self, cfg: RolloutServerConfig, pool) -> None:
        from mvlm.rl.rollout import wire

        self.cfg = cfg
        self.pool = pool
        self.lock = threading.Lock()
        self.model_manifest = wire.check_manifest(wire.checkpoint_manifest(cfg.model))
        self.weight_version = 0
        self.dtype = None  # the engines' model dtype, known once they are up
        self.stale: str | None = None
        self.sync: _Sync | None = None
        self.last_sync: dict = {}

    def health(self) -> dict:
        return {"status": "ok", "model": self.cfg.model, "weight_version": self.weight_version,
                "dtype": wire_dtype(self.dtype),
                "stale": self.stale, "engines": self.cfg.vllm_data_parallel_size,
                "tensor_parallel_size": self.cfg.tensor_parallel_size,
                "syncing": self.sync is not None, "last_sync": self.last_sync}

    def manifest(self) -> dict:
        return {"manifest": [{"name": n, "shape": s, "dtype": d}
                             for n, (s, d) in self.model_manifest.items()]}

    def generate(self, req: dict) -> dict:
        from mvlm.rl.rollout.base import SamplingParams

        if self.stale:
            raise SyncError(f"the engine's weights are stale ({self.stale}); finish a complete "
                            "weight sync before generating")
        if self.sync is not None:
            raise SyncError(f"weight sync {self.sync.sync_id} is in progress; finish or abort "
                            "it before generating")
        prompts = req.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, list) and p for p in prompts):
            raise ValueError("generate: 'prompts' must be a list of non-empty token-id lists")
        s = dict(req.get("sampling") or {})
        sp = SamplingParams(**{k: v for k, v in s.items()
                               if k in SamplingParams.__dataclass_fields__})
        sampling = dict(sp.__dict__, suppress_token_ids=list(sp.suppress_token_ids))
        t0 = time.perf_counter()
        groups = self.pool.generate([[int(t) for t in p] for p in prompts], sampling)
        return {"groups": groups, "weight_version": self.weight_version,
                "seconds": time.perf_counter() - t0}

    # -- weight sync --
    def begin(self, req: dict) -> dict:
        from mvlm.rl.rollout import wire

        if self.sync is not None:
            self._fail(f"sync {self.sync.sync_id} was abandoned by a new begin")
        man = wire.check_manifest(req.get("manifest") or [])
        want = self.model_manifest
        missing = sorted(set(want) - set(man))
        extra = sorted(set(man) - set(want))
        if missing or extra:
            raise SyncError(
                "weight manifest does not match the served checkpoint: "
                + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} " if missing
                   else "")
                + (f"unknown {extra[:5]}{' ...' if len(extra) > 5 else ''}" if extra else ""))
        bad = [f"{n}: {man[n][0]} vs served {want[n][0]}" for n in man if man[n][0] != want[n][0]]
        if bad:
            raise SyncError(f"weight manifest shapes differ from the served checkpoint: {bad[:5]}")
        sid = f"{int(time.time() * 1000)}-{os.getpid()}"
        self.pool.sync_begin()
        self.sync = _Sync(sid, man, set(), time.perf_counter())
        return {"sync_id": sid, "tensors": len(man)}

    def _current(self, sync_id: str | None) -> _Sync:
        if self.sync is None:
            raise SyncError("no weight sync in progress: call /weights/begin first")
        if sync_id != self.sync.sync_id:
            raise SyncError(f"sync_id {sync_id!r} is not the sync in progress "
                            f"({self.sync.sync_id})")
        return self.sync

    def _fail(self, why: str) -> None:
        """End the sync in progress as failed: the engines finish vLLM's reload (layers that got
        nothing keep their weights, partly sent ones are processed as they are), and are marked
        stale until a complete sync."""
        self.stale = why
        if self.sync is not None:
            self.sync = None
            try:
                self.pool.sync_finish()
            except Exception as e:
                log.error("closing the failed sync: %s", e)

    def bucket(self, sync_id: str | None, body: bytes) -> dict:
        from mvlm.rl.rollout import wire

        s = self._current(sync_id)
        try:
            tensors = wire.unpack_bucket(body)
        except Exception as e:
            self._fail(f"bucket {s.buckets} unreadable")
            raise SyncError(f"bucket {s.buckets} is not a safetensors body: {e}") from e
        for name, t in tensors.items():
            if name not in s.manifest:
                self._fail(f"unexpected tensor {name}")
                raise SyncError(f"weight sync: tensor {name} is not in the manifest (renamed or "
                                "not part of the served model)")
            if name in s.received:
                self._fail(f"tensor {name} sent twice")
                raise SyncError(f"weight sync: tensor {name} arrived twice (each HF tensor "
                                "must be sent exactly once)")
            shape, dt = s.manifest[name]
            got_dt = wire.dtype_name(t.dtype)
            if list(t.shape) != shape or got_dt != dt:
                self._fail(f"tensor {name} mis-shaped")
                raise SyncError(f"weight sync: tensor {name} arrived as {list(t.shape)} {got_dt}"
                                f" but the manifest says {shape} {dt}")
        try:
            self.pool.load(list(tensors.items()))
        except Exception as e:
            self._fail(f"loading bucket {s.buckets} failed")
            raise EngineError(f"loading bucket {s.buckets} into the engine failed: {e}") from e
        s.received.update(tensors)
        s.nbytes += len(body)
        s.buckets += 1
        return {"received": len(s.received), "of": len(s.manifest)}

    def finish(self, req: dict) -> dict:
        s = self._current(req.get("sync_id"))
        missing = sorted(set(s.manifest) - s.received)
        if missing:
            self._fail(f"{len(missing)} tensors never arrived")
            raise SyncError(f"weight sync: {len(missing)} manifest tensors never arrived: "
                            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.sync = None
        self.pool.sync_finish()
        self.pool.reset_prefix_cache()
        self.weight_version = int(req.get("weight_version") or self.weight_version + 1)
        self.stale = None
        self.sync = None
        self.last_sync = {"tensors": len(s.received), "bytes": s.nbytes, "buckets": s.buckets,
                          "seconds": time.perf_counter() - s.started}
        return {"weight_version": self.weight_version, **self.last_sync}

    def abort(self, req: dict) -> dict:
        if self.sync is not None:
            self._fail(f"sync {self.sync.sync_id} aborted by the client")
        return {"stale": self.stale}

    def read(self, req: dict) -> bytes:
        from mvlm.rl.rollout import wire

        names = req.get("names")
        if not isinstance(names, list) or not names:
            raise ValueError("read: 'names' must be a non-empty list of HF tensor names")
        return wire.pack_bucket(self._read(names))

    def digest(self, req: dict) -> dict:
        """sha256 of each named tensor read back from engine 0, in the engine's dtype, a few at
        a time (bounded memory; only digests cross the wire)."""
        from mvlm.rl.rollout import wire

        names = req.get("names")
        if not isinstance(names, list) or not names:
            raise ValueError("digest: 'names' must be a non-empty list of HF tensor names")
        out = {}
        for i in range(0, len(names), 16):
            for n, t in self._read(names[i:i + 16]).items():
                out[n] = wire.tensor_digest(t.to(self.dtype))
        return {"dtype": wire.dtype_name(self.dtype), "digests": out}

    def _read(self, names: list[str]) -> dict:
        unknown = [n for n in names if n not in self.model_manifest]
        if unknown:
            raise KeyError(f"read: {unknown[:5]} are not tensors of the served checkpoint")
        got = self.pool.read(names)
        out = {}
        for n, t in got.items():
            shape = self.model_manifest[n][0]
            if list(t.shape) != shape:  # vocab rows padded by vLLM: keep the real ones
                if t.dim() == len(shape) and all(a >= b for a, b in zip(t.shape, shape)):
                    for dim, size in enumerate(shape):
                        t = t.narrow(dim, 0, size)
                else:
                    raise ValueError(f"read: {n} is {list(t.shape)} in the engine, {shape} in "
                                     "the checkpoint")
            out[n] = t
        return out


def _make_handler(service: RolloutService):
    from mvlm.rl.rollout import wire

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # route through logging, at debug
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj) -> None:
            self._send(code, json.dumps(obj).encode())

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def do_GET(self):  # noqa: N802
            path = urlparse(self.path).path
            if path == wire.HEALTH:
                return self._json(200, service.health())
            if path == wire.MANIFEST:
                return self._json(200, service.manifest())
            return self._json(404, {"error": f"no route {path}"})

        def do_POST(self):  # noqa: N802
            u = urlparse(self.path)
            body = self._body()
            try:
                with service.lock:
                    if u.path == wire.SYNC_BUCKET:
                        sid = (parse_qs(u.query).get("sync_id") or [None])[0]
                        return self._json(200, service.bucket(sid, body))
                    req = json.loads(body or b"{}")
                    if u.path == wire.GENERATE:
                        return self._json(200, service.generate(req))
                    if u.path == wire.SYNC_BEGIN:
                        return self._json(200, service.begin(req))
                    if u.path == wire.SYNC_FINISH:
                        return self._json(200, service.finish(req))
                    if u.path == wire.SYNC_ABORT:
                        return self._json(200, service.abort(req))
                    if u.path == wire.DIGEST_WEIGHTS:
                        return self._json(200, service.digest(req))
                    if u.path == wire.READ_WEIGHTS:
                        return self._send(200, service.read(req), "application/octet-stream")
                return self._json(404, {"error": f"no route {u.path}"})
            except (SyncError, ValueError, KeyError, TypeError) as e:
                return self._json(400, {"error": str(e), "kind": type(e).__name__})
            except Exception as e:
                log.exception("request %s failed", u.path)
                return self._json(500, {"error": f"{type(e).__name__}: {e}",
                                        "kind": type(e).__name__})

    return Handler


def serve(cfg: RolloutServerConfig) -> int:
    """Start the engines, serve until SIGTERM / SIGINT, close the engines, return 0."""
    service = RolloutService(cfg, None)  # validates the checkpoint's tensor list first
    t0 = time.perf_counter()
    pool = EnginePool(cfg)
    service.pool = pool
    import torch

    service.dtype = getattr(torch, pool.dtypes[0])
    httpd = ThreadingHTTPServer((cfg.host, cfg.port), _make_handler(service))
    httpd.daemon_threads = True
    stopping = threading.Event()

    def stop(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            log.info("signal %d: shutting down", signum)
            threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("mvlm rollout: serving %s on http://%s:%d (%d engine(s) x TP %d, ready in %.1f s)",
             cfg.model, cfg.host, cfg.port, cfg.vllm_data_parallel_size,
             cfg.tensor_parallel_size, time.perf_counter() - t0)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
        pool.close()
        log.info("mvlm rollout: stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = RolloutServerConfig(**vars(args))
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="[%(asctime)s rollout] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        print(f"mvlm rollout: error: vLLM is not importable in {sys.executable} ({e}); run "
              "scripts/setup_vllm_cpu_venv.sh or start `mvlm rollout` from mvlm's CLI, which "
              "finds that venv", file=sys.stderr)
        return 2
    return serve(cfg)


if __name__ == "__main__":  # vLLM spawns worker processes: the guard is required
    sys.exit(main())
