"""Worker for tests/dist/test_stream_hf.py (torchrun, 2 ranks, gloo, CPU, fp32).

For each case of the spec (a tiny HF checkpoint and a layout: TP2, PP2, TP2 x EP2 with ETP1) the
model is built, loaded from the HF dir, and streamed with ``iter_hf_tensors`` in every receivers
mode. Each yielded tensor is compared at once (torch.equal, dtype, shape) with the original
safetensors tensor and dropped; the worker records which rank got which name, the stream's own
peak-held count, the largest full parameter, and how many earlier yielded tensors were still
alive (weakrefs) when the next one arrived, i.e. whether the generator kept anything.
Results of all ranks go to spec["out"] (JSON) on rank 0.
"""
from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import torch
from _worker_common import drop_groups, worker_process_group, write_gathered


def stream_case(bundle, reader, receivers: str, dtype: torch.dtype | None) -> dict:
    from mvlm.convert.stream import StreamStats, iter_hf_tensors

    stats = StreamStats()
    names: list[str] = []
    bad: list[str] = []
    refs: list[weakref.ref] = []
    alive_max = 0
    for name, t in iter_hf_tensors(bundle, receivers=receivers, dtype=dtype, stats=stats):
        alive_max = max(alive_max, sum(r() is not None for r in refs))
        refs = [weakref.ref(t)]
        disk = reader.disk_name(name)
        names.append(disk)
        want = reader.read(name)
        if dtype is not None:
            want = want.to(dtype)
        if t.dtype != want.dtype or t.shape != want.shape or not torch.equal(t, want):
            bad.append(f"{disk}: got {t.dtype} {tuple(t.shape)}, want {want.dtype} "
                       f"{tuple(want.shape)}")
        del t, want
    gc.collect()
    return {"names": names, "bad": bad, "peak": stats.peak_numel,
            "largest": stats.largest_full_numel, "alive_max": alive_max,
            "tensors": stats.tensors}


def largest_full_param(bundle) -> int:
    """Largest whole (TP-gathered) Megatron parameter on this rank, from shapes alone."""
    from mvlm.convert.bridge import param_entries, shard_ctx
    from mvlm.convert.stream import full_shape

    return max(torch.Size(full_shape(e, shard_ctx(bundle, e.mapping))).numel()
               for e in param_entries(bundle))


def run_case(case: dict) -> dict:
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.convert.hf_io import SafetensorsReader
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup

    layout = ParallelLayout(**case["layout"])
    startup(layout, device="cpu")
    hf = Path(case["hf"])
    bundle = build_model(AutoConfig.from_pretrained(hf), layout, dtype=torch.float32,
                         device="cpu", perform_initialization=False)
    load_hf_weights(bundle, hf)
    reader = SafetensorsReader(hf)
    out = {"largest_param": largest_full_param(bundle),
           "tied": bool(bundle.arch.tie_word_embeddings), "keys": sorted(reader.keys())}
    for receivers in ("group_first", "owners", "rank0"):
        out[receivers] = stream_case(bundle, reader, receivers, None)
    out["group_first_bf16"] = stream_case(bundle, reader, "group_first", torch.bfloat16)
    drop_groups()
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    with worker_process_group():
        write_gathered(spec["out"], {name: run_case(case) for name, case in spec["cases"].items()})


if __name__ == "__main__":
    main()
