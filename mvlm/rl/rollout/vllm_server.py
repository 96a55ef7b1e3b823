"""The trainer's side of server mode: a :class:`RolloutEngine` backed by an ``mvlm rollout``
server (ms-swift's ``--vllm_mode server`` with ``--vllm_server_host/--vllm_server_port`` or
``--vllm_server_base_url`` and ``--vllm_server_timeout``).

Weight sync (``load_weights``), and why it is shaped this way:

* **Bounded memory.** Tensors are taken from :func:`mvlm.convert.stream.iter_hf_tensors` one at
  a time and packed into buckets of at most ``--weight_sync_bucket_mb`` (default 512); a bucket is
  sent and dropped before the next one fills, so the trainer holds about one bucket (plus its
  serialised bytes) above its own memory, never a second copy of the model.
* **Only the ranks that own a tensor read it; rank 0 sends.** Every rank iterates the stream
  (it is collective); call it with ``receivers="rank0"`` so the owners gather their tensors and
  hand them to global rank 0, which alone talks to the server. A tensor arriving on another rank
  is refused (it would be silently dropped otherwise).
* **Manifest.** A sync begins with the list of every HF tensor (name, shape, dtype) that will
  follow: by default the served checkpoint's own list (the engine's ground truth), with the
  dtype the trainer sends. The server refuses a tensor that is not in it, that arrives twice, or
  with another shape or dtype, and a finish with tensors missing, naming them. A failed sync
  leaves the engine marked stale: it refuses to generate until a complete sync.
* **Check.** ``check_weight_sync=True`` keeps a sha256 of every tensor sent (in the engine's
  dtype) and, after the sync, has the server digest each tensor read back from the engine as its
  kernels use it: any difference names the tensors. Only digests are kept and exchanged.

Transport on CPU: HTTP request bodies carrying safetensors-serialised buckets
(:mod:`mvlm.rl.rollout.wire`). Errors on one rank are broadcast so that every rank of the job
raises the same message instead of the others hanging in the next collective.
"""
from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from mvlm.rl.rollout import wire
from mvlm.rl.rollout.base import (
    Completion,
    RolloutEngine,
    RolloutGroup,
    RolloutPrompt,
    SamplingParams,
)

__all__ = ["RolloutServerError", "ServerTimeout", "VLLMServerConfig", "VLLMServerEngine",
           "WeightSyncMismatch"]


class RolloutServerError(RuntimeError):
    """The rollout server refused a request, failed it, or is gone."""


class ServerTimeout(RolloutServerError, TimeoutError):
    """The rollout server did not answer its health check in time."""


class WeightSyncMismatch(RolloutServerError):
    """--check_weight_sync: a tensor read back from the engine differs from what was sent."""


@dataclass
class VLLMServerConfig:
    """ms-swift's server-mode flags. ``vllm_server_base_url`` wins over host/port."""

    vllm_server_host: str = "127.0.0.1"
    vllm_server_port: int = 8000
    vllm_server_base_url: str | None = None
    vllm_server_timeout: float = 240.0
    weight_sync_bucket_mb: float = 512.0
    check_weight_sync: bool = False
    # request timeout for one generate / bucket call (seconds)
    request_timeout: float = 3600.0

    def __post_init__(self) -> None:
        if self.vllm_server_base_url:
            u = urlparse(self.vllm_server_base_url)
            if u.scheme != "http" or not u.hostname:
                raise ValueError(f"--vllm_server_base_url {self.vllm_server_base_url!r}: "
                                 "expected http://HOST:PORT")
            self.vllm_server_host = u.hostname
            self.vllm_server_port = u.port or 80
        if self.weight_sync_bucket_mb <= 0:
            raise ValueError(f"--weight_sync_bucket_mb must be > 0, got "
                             f"{self.weight_sync_bucket_mb}")
        if self.vllm_server_timeout <= 0:
            raise ValueError(f"--vllm_server_timeout must be > 0, got {self.vllm_server_timeout}")

    @property
    def address(self) -> str:
        return f"{self.vllm_server_host}:{self.vllm_server_port}"


class _Http:
    """Minimal JSON / bytes client over http.client (no extra dependency in the trainer)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout

    def request(self, method: str, path: str, body: bytes | None = None,
                ctype: str = "application/json", timeout: float | None = None
                ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port,
                                          timeout=timeout or self.timeout)
        try:
            conn.request(method, path, body=body,
                         headers={"Content-Type": ctype} if body is not None else {})
            r = conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException) as e:
            raise RolloutServerError(
                f"rollout server at {self.host}:{self.port} is unreachable or died during "
                f"{method} {path}: {type(e).__name__}: {e}") from e
        finally:
            conn.close()

    def json(self, method: str, path: str, obj=None, timeout: float | None = None) -> dict:
        body = None if obj is None else json.dumps(obj).encode()
        status, data = self.request(method, path, body, timeout=timeout)
        return self._decode(method, path, status, data)

    def _decode(self, method: str, path: str, status: int, data: bytes) -> dict:
        try:
            out = json.loads(data) if data else {}
        except json.JSONDecodeError:
            out = {"error": data[:500].decode(errors="replace")}
        if status != 200:
            raise RolloutServerError(f"rollout server {self.host}:{self.port} {method} {path}: "
                                     f"{out.get('error', status)}")
        return out


def wait_for_server(cfg: VLLMServerConfig, poll: float = 0.5) -> dict:
    """Poll /health until it answers or ``vllm_server_timeout`` passes (-> ServerTimeout)."""
    http_ = _Http(cfg.vllm_server_host, cfg.vllm_server_port, timeout=5.0)
    deadline = time.monotonic() + cfg.vllm_server_timeout
    last = "no answer"
    while True:
        try:
            status, data = http_.request("GET", wire.HEALTH, timeout=5.0)
            if status == 200:
                return json.loads(data)
            last = f"HTTP {status}"
        except RolloutServerError as e:
            last = str(e.__cause__ or e)
        if time.monotonic() >= deadline:
            raise ServerTimeout(
                f"no rollout server answered at {cfg.address} within "
                f"{cfg.vllm_server_timeout:g} s (--vllm_server_timeout; last: {last}); start it "
                f"with `mvlm rollout --model MODEL --host {cfg.vllm_server_host} --port "
                f"{cfg.vllm_server_port}` or fix --vllm_server_host/--vllm_server_port")
        time.sleep(poll)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast(obj, src: int = 0, group=None):
    """obj from ``src`` to every rank of ``group`` (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class VLLMServerEngine(RolloutEngine):
    """:class:`RolloutEngine` over HTTP to ``mvlm rollout``.

    Collective in a distributed job: ``generate`` is called by every rank of ``group`` (default:
    Megatron-Core's model-parallel group when initialised, else each process alone) with the
    same prompts; the group's first rank asks the server and broadcasts the answer.
    ``load_weights`` is called by every rank of the job (see the module docstring).
    """

    def __init__(self, cfg: VLLMServerConfig | None = None, group=None,
                 wait: bool = True) -> None:
        self.cfg = cfg or VLLMServerConfig()
        self.http = _Http(self.cfg.vllm_server_host, self.cfg.vllm_server_port,
                          self.cfg.request_timeout)
        self._version = 0
        self.last_sync: dict = {}
        self.health = wait_for_server(self.cfg) if wait else {}
        self.group = group if group is not None else _default_group()
        self._server_manifest: list[dict] | None = None

    # ---- interface -----------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompts: Sequence[RolloutPrompt], params: SamplingParams
                 ) -> list[RolloutGroup]:
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if any(v is not None for v in p.media.values()):
                raise ValueError(f"prompt {i} carries media {sorted(p.media)}: the vLLM server "
                                 "engine takes token-id prompts only (text models); use the "
                                 "built-in engine (--use_vllm false) for image prompts")
        if self.group is None:  # each process asks for itself
            return self._generate_http(prompts, params)
        src = dist.get_process_group_ranks(self.group)[0]
        result = err = None
        if _rank() == src:
            try:
                result = self._generate_http(prompts, params)
            except Exception as e:  # every rank must raise, not wait in the broadcast
                err = f"{type(e).__name__}: {e}"
        result, err = _broadcast((result, err), src=src, group=self.group)
        if err:
            raise RolloutServerError(err)
        return result

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     manifest: list[dict] | None = None, dtype: torch.dtype | None = None
                     ) -> int:
        """Push a full weight update. ``weights``: every rank's (HF name, tensor) stream, e.g.
        ``iter_hf_tensors(bundle, receivers="rank0")`` (only rank 0 may receive tensors).
        ``manifest``: what will arrive (default: the served checkpoint's list, in ``dtype``).
        ``dtype``: cast every tensor to this before sending (default: the manifest's dtype, or
        the tensor's own when a manifest entry has none). Returns the new weight version."""
        t0 = time.perf_counter()
        me = _rank()
        error: str | None = None
        sync = _BucketSync(self, manifest, dtype) if me == 0 else None
        for name, t in weights:
            if me != 0:
                if error is None:
                    error = (f"rank {me} received {name} from the weight stream: stream with "
                             "iter_hf_tensors(..., receivers='rank0') so that rank 0 sends")
                continue
            if error is None:
                try:
                    sync.add(name, t)
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
                    sync.abort()
            # on error keep draining: the other ranks are still in the stream's collectives
        result = None
        if me == 0 and error is None:
            try:
                result = sync.finish()
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                sync.abort()
        errors = [error]
        if dist.is_available() and dist.is_initialized():
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        result = _broadcast(result, src=0)
        bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
        if bad:
            raise RolloutServerError("weight sync failed: " + "; ".join(bad))
        self._version = int(result["weight_version"])
        self.last_sync = dict(result, client_seconds=time.perf_counter() - t0)
        return self._version

    # ---- helpers -------------------------------------------------------------------------
    def server_manifest(self) -> list[dict]:
        if self._server_manifest is None:
            self._server_manifest = self.http.json("GET", wire.MANIFEST)["manifest"]
        return self._server_manifest

    def read_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """HF tensors read back from the engine (for --check_weight_sync and tests)."""
        status, data = self.http.request("POST", wire.READ_WEIGHTS,
                                         json.dumps({"names": list(names)}).encode())
        if status != 200:
            self.http._decode("POST", wire.READ_WEIGHTS, status, data)
        return wire.unpack_bucket(data)

    def _generate_http(self, prompts: list[RolloutPrompt], params: SamplingParams
                       ) -> list[RolloutGroup]:
        sampling = {k: v for k, v in params.__dict__.items()}
        sampling["suppress_token_ids"] = [int(t) for t in params.suppress_token_ids]
        out = self.http.json("POST", wire.GENERATE, {
            "prompts": [[int(t) for t in p.input_ids] for p in prompts], "sampling": sampling})
        groups = out["groups"]
        if len(groups) != len(prompts):
            raise RolloutServerError(f"server returned {len(groups)} groups for "
                                     f"{len(prompts)} prompts")
        res = []
        for i, g in enumerate(groups):
            if len(g) != params.num_generations:
                raise RolloutServerError(f"prompt {i}: {len(g)} completions, expected "
                                         f"{params.num_generations}")
            res.append(RolloutGroup(i, [Completion(i, c["token_ids"], c["logprobs"],
                                                   c["sampling_logprobs"], c["stop_reason"])
                                        for c in g]))
        return res


class _BucketSync:
    """Rank 0's side of one sync: manifest, buckets of bounded size, optional read-back."""

    def __init__(self, engine: VLLMServerEngine, manifest: list[dict] | None,
                 dtype: torch.dtype | None) -> None:
        self.engine = engine
        self.dtype = dtype
        if manifest is None:
            manifest = [dict(e, dtype=wire.dtype_name(dtype) if dtype is not None
                             else e["dtype"]) for e in engine.server_manifest()]
        self.manifest = wire.check_manifest(manifest)
        self.limit = int(engine.cfg.weight_sync_bucket_mb * 2**20)
        self.bucket: dict[str, torch.Tensor] = {}
        self.size = 0
        self.sent_bytes = 0
        self.buckets = 0
        self.max_bucket_bytes = 0
        self.largest_tensor_bytes = 0
        # --check_weight_sync: digest of each tensor in the engine's dtype, checked after finish
        self.digests: dict[str, str] = {}
        self.engine_dtype = (wire.torch_dtype(engine.health["dtype"])
                             if engine.cfg.check_weight_sync else None)
        self.sync_id = engine.http.json("POST", wire.SYNC_BEGIN, {
            "manifest": [{"name": n, "shape": s, "dtype": d}
                         for n, (s, d) in self.manifest.items()]})["sync_id"]
        self.t0 = time.perf_counter()

    def add(self, name: str, t: torch.Tensor) -> None:
        want = self.manifest.get(name)
        dt = (self.dtype if self.dtype is not None
              else wire.torch_dtype(want[1]) if want is not None else t.dtype)
        t = t.detach().to(device="cpu", dtype=dt)
        nbytes = t.numel() * t.element_size()
        self.largest_tensor_bytes = max(self.largest_tensor_bytes, nbytes)
        if self.bucket and self.size + nbytes > self.limit:
            self.flush()
        self.bucket[name] = t
        self.size += nbytes
        if self.engine_dtype is not None:
            self.digests[name] = wire.tensor_digest(t.to(self.engine_dtype))

    def flush(self) -> None:
        if not self.bucket:
            return
        body = wire.pack_bucket(self.bucket)
        status, data = self.engine.http.request(
            "POST", f"{wire.SYNC_BUCKET}?sync_id={self.sync_id}", body,
            ctype="application/octet-stream")
        self.engine.http._decode("POST", wire.SYNC_BUCKET, status, data)
        self.sent_bytes += len(body)
        self.max_bucket_bytes = max(self.max_bucket_bytes, len(body))
        del body
        self.buckets += 1
        self.bucket, self.size = {}, 0

    def _check(self) -> int:
        """Every tensor read back from the engine (as its kernels use it) must equal what was
        sent, cast to the engine's dtype: compared by sha256, so nothing model-sized is held."""
        names = sorted(self.digests)
        bad = []
        for i in range(0, len(names), 256):
            got = self.engine.http.json("POST", wire.DIGEST_WEIGHTS,
                                        {"names": names[i:i + 256]})["digests"]
            bad += [n for n in names[i:i + 256] if got.get(n) != self.digests[n]]
        if bad:
            raise WeightSyncMismatch(
                f"--check_weight_sync: {len(bad)} tensors read back from the engine differ from "
                f"what the trainer sent: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
        return len(names)

    def finish(self) -> dict:
        self.flush()
        out = self.engine.http.json("POST", wire.SYNC_FINISH, {
            "sync_id": self.sync_id, "weight_version": self.engine.weight_version + 1})
        if self.engine_dtype is not None:
            out["checked_tensors"] = self._check()
        out.update(client_bytes=self.sent_bytes, client_buckets=self.buckets,
                   max_bucket_bytes=self.max_bucket_bytes, bucket_limit_bytes=self.limit,
                   largest_tensor_bytes=self.largest_tensor_bytes,
                   send_seconds=time.perf_counter() - self.t0)
        return out

    def abort(self) -> None:
        try:
            self.engine.http.json("POST", wire.SYNC_ABORT, {"sync_id": self.sync_id})
        except RolloutServerError:
            pass  # the server is gone or already failed the sync: it is stale either way


def _default_group():
    """Megatron-Core's model-parallel group when it exists (ranks that must see the same
    rollouts), else None (each process on its own)."""
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_model_parallel_group()
    return None
