"""Weight-sync benchmark: trainer (Megatron-Core, one rank) -> ``mvlm rollout`` (vLLM, CPU).

A random Qwen2 checkpoint of the "bench" size (hidden 1024, 8 layers, ~91 M parameters, 365 MB
in fp32) is served by ``mvlm rollout --torch_dtype float32``; the trainer process builds the
Megatron model from the same checkpoint and pushes every weight with
``VLLMServerEngine.load_weights(iter_hf_tensors(bundle, receivers="rank0"))`` at a few
``--weight_sync_bucket_mb`` sizes (HTTP bodies holding safetensors buckets, the CPU transport).

Measured per bucket size (best of ``--repeats``; a warm-up sync first):

* seconds of the whole sync (client side: stream + pack + send + the server loading each bucket
  into vLLM + finish) and MB/s = bytes sent / seconds;
* peak RSS of the trainer process during the sync minus its RSS just before (the model and
  everything else it holds): what the sync itself costs in host memory. A thread samples
  /proc/self/statm every 2 ms. Expected: about one bucket (+ its serialised bytes), not the model.

    python bench/vllm_sync.py [--record]      (needs scripts/setup_vllm_cpu_venv.sh's venv)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` is the largest seen."""

    def __init__(self, every: float = 0.002) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self):
        self.peak = rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket_mb", type=float, nargs="+", default=[16, 64, 512])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--port", type=int, default=18931)
    ap.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    ap.add_argument("--workdir", default="/tmp/mvlm_bench_vllm_sync")
    a = ap.parse_args()
    if "RANK" not in os.environ:  # one torchrun rank (Megatron-Core wants a process group)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
               "--master-addr=127.0.0.1", "--master-port=29517", __file__, *sys.argv[1:]]
        return subprocess.call(cmd)

    import torch
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.convert.stream import iter_hf_tensors
    from mvlm.models.vlm import build_model
    from mvlm.rl.rollout.vllm_server import VLLMServerConfig, VLLMServerEngine
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    work = Path(a.workdir)
    hf = work / "hf"
    if not (hf / "config.json").exists():
        build_tiny_checkpoint("qwen2", hf, variant="bench")
    log = open(work / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mvlm", "rollout", "--model", str(hf), "--port", str(a.port),
         "--torch_dtype", "float32", "--vllm_max_model_len", "512",
         "--vllm_gpu_memory_utilization", "0.05"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    rows = []
    try:
        startup(ParallelLayout(), device="cpu", seed=0)
        bundle = build_model(AutoConfig.from_pretrained(hf), ParallelLayout(),
                             dtype=torch.float32, device="cpu", perform_initialization=False)
        load_hf_weights(bundle, hf)
        model_bytes = sum(p.numel() * p.element_size() for m in bundle.models
                          for p in m.parameters())
        t0 = time.perf_counter()
        VLLMServerEngine(VLLMServerConfig(vllm_server_port=a.port, vllm_server_timeout=900))
        up = time.perf_counter() - t0
        for mb in a.bucket_mb:
            eng = VLLMServerEngine(VLLMServerConfig(vllm_server_port=a.port,
                                                    weight_sync_bucket_mb=mb))
            base = rss()
            with PeakRSS() as peak:  # warm-up; its peak is the first sync's at this size
                eng.load_weights(iter_hf_tensors(bundle, receivers="rank0"))
            first_extra = (peak.peak - base) / 2**20
            best = None
            for _ in range(a.repeats):
                base = rss()
                with PeakRSS() as peak:
                    t = time.perf_counter()
                    eng.load_weights(iter_hf_tensors(bundle, receivers="rank0"))
                    secs = time.perf_counter() - t
                extra = peak.peak - base
                r = {"bucket_mb": mb, "seconds": secs,
                     "mb_per_s": eng.last_sync["client_bytes"] / 2**20 / secs,
                     "extra_rss_mb": extra / 2**20, "buckets": eng.last_sync["client_buckets"],
                     "max_bucket_mb": eng.last_sync["max_bucket_bytes"] / 2**20,
                     "first_extra_rss_mb": first_extra}
                best = r if best is None or r["seconds"] < best["seconds"] else best
            rows.append(best)
            print(json.dumps(best), flush=True)
    finally:
        server.terminate()
        server.wait(120)
    lines = [
        f"## vLLM weight sync (bench/vllm_sync.py, {datetime.now(UTC):%Y-%m-%d}, "
        f"{os.cpu_count()}-core CPU shared with other jobs, no GPU)",
        "",
        f"Trainer: Megatron-Core, one rank, fp32, Qwen2 bench size ({model_bytes / 2**20:.0f} MB "
        f"of weights); server: `mvlm rollout --torch_dtype float32` (vllm-cpu 0.32, own venv; "
        f"up in {up:.0f} s); transport: HTTP bodies with safetensors buckets on loopback. "
        f"Python {platform.python_version()}. Best of {a.repeats} after a warm-up sync.",
        "",
        "| --weight_sync_bucket_mb | buckets | largest bucket MB | sync s | MB/s | "
        "trainer peak RSS above its own, MB (first sync at this size / later) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['bucket_mb']:g} | {r['buckets']} | {r['max_bucket_mb']:.1f} | "
                     f"{r['seconds']:.2f} | {r['mb_per_s']:.0f} | "
                     f"{r['first_extra_rss_mb']:.0f} / {r['extra_rss_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if a.record:
        with open(REPO / "docs" / "benchmarks.md", "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
