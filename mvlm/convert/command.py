"""`mvlm convert`: HF -> Megatron-Core torch_dist, and back, at any layout.

    torchrun --nproc-per-node N -m mvlm convert --to mcore --model HF_DIR --output MCORE_DIR \
        --tp T --pp P [--ep E] [--etp 1] [--torch_dtype float32|bfloat16] [--verify]
    torchrun --nproc-per-node N -m mvlm convert --to hf --model MCORE_DIR --output HF_DIR2 \
        [--tp T --pp P --ep E]

N = TP x PP x data-parallel; with N = 1 plain ``mvlm convert ...`` works. Output directories
appear only when complete (staging dir + rename); ``--verify`` failing leaves none.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from mvlm.convert.bridge import export_hf_weights, load_hf_weights
from mvlm.convert.flags import (  # noqa: F401 - re-exported
    ConvertConfig,
    add_convert_args,
    add_layout_args,
)
from mvlm.convert.hf_io import (
    SafetensorsReader,
    copy_aux_files,
    open_hf_reader,
    release_file_maps,
)
from mvlm.convert.mcore_ckpt import (
    dtype_from_name,
    is_mcore_checkpoint,
    load_mcore,
    read_meta,
    save_mcore,
)
from mvlm.convert.publish import staged_publish
from mvlm.runtime.parallel import ParallelLayout, destroy_distributed
from mvlm.runtime.startup import startup

log = logging.getLogger("mvlm.convert")


def parse_size(s: str) -> int:
    s = s.strip().upper()
    for unit, mul in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mul)
    return int(s)


def _hf_dtype(cfg) -> torch.dtype | None:
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, str):
        return dtype_from_name(d) if d in ("float32", "bfloat16", "float16") else None
    return d if isinstance(d, torch.dtype) else None


def run_convert(cfg: ConvertConfig) -> int:
    """Convert ``cfg.model`` into ``cfg.output`` (collective over the launch's ranks)."""
    from transformers import AutoConfig

    from mvlm.models.gpt import validate_layout
    from mvlm.models.registry import foreign_layout, get_family, load_hf_config
    from mvlm.models.spec import choose_backend
    from mvlm.models.vlm import build_model

    layout = ParallelLayout(tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, ep=cfg.ep, etp=cfg.etp)
    src = Path(cfg.model)
    out = Path(cfg.output)
    # Cheap checks before any process group exists: bad paths, unsupported model, layout.
    if not src.exists():
        raise FileNotFoundError(f"--model {src} does not exist")
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"output directory {out} already exists: pass --overwrite to "
                              "replace it, or choose another --output")
    if cfg.to == "mcore":
        if is_mcore_checkpoint(src):
            raise ValueError(f"{src} is already an mvlm Megatron checkpoint; use --to hf")
        if cfg.verify and foreign_layout(src) is not None:
            raise ValueError(f"--verify compares against transformers, which cannot load {src} "
                             "(a layout that needs remote code); convert without --verify, "
                             "then verify the --to hf export")
        hf_config = load_hf_config(src)  # a foreign layout's config is translated
        family = get_family(hf_config.model_type)  # unsupported model types fail here
        validate_layout(family.text_arch(hf_config), layout)  # TP/EP/PP must divide the model
        open_hf_reader(src)  # missing/corrupt shards (or original-layout gaps) fail here
    else:
        meta = read_meta(src)
        validate_layout(get_family(meta["model_type"]).text_arch(
            AutoConfig.from_pretrained(src / "hf")), layout)
    device = startup(layout, seed=1234, device=cfg.device).device
    t0 = time.time()
    rss_start = _rss_mb()
    clock = PhaseClock()
    backend = choose_backend(device, cfg.transformer_impl)
    try:
        if cfg.to == "mcore":
            dtype = dtype_from_name(cfg.torch_dtype, _hf_dtype(hf_config) or torch.float32)
            if cfg.verify and cfg.torch_dtype is None:
                dtype = torch.float32
            with clock("build"):
                bundle = build_model(hf_config, layout, dtype=dtype, device=device,
                                     backend=backend, perform_initialization=False)
            with clock("read"):
                map_unchanged_params(bundle, src)  # pass-through tensors: no copy at all
                load_hf_weights(bundle, src)
            if cfg.verify:
                with clock("verify"):
                    _verify(bundle, src, cfg.verify_tol, device)
            with clock("write"):
                save_mcore(bundle, out, layout, hf_src=src, overwrite=cfg.overwrite,
                           extra_meta={"hf_dtype": str(_hf_dtype(hf_config) or "")})
        else:
            dtype = dtype_from_name(cfg.torch_dtype) if cfg.torch_dtype else None
            with clock("read"):  # includes building the model
                # pass-through weights stay memory maps of the checkpoint (no read, no copy)
                bundle, meta = load_mcore(src, layout, device=device, dtype=dtype,
                                          backend=backend, map_params=True)
            export_dtype = _hf_dtype(bundle.hf_config) or bundle.config.params_dtype
            check = None
            if cfg.verify:
                def check(staged: Path) -> None:
                    with clock("verify"):
                        _verify(bundle, staged, cfg.verify_tol, device)
            with clock("write"):
                export_to_hf(bundle, src / "hf", out, export_dtype, cfg.overwrite,
                             parse_size(cfg.max_shard_size), before_publish=check)
        params_mb = sum(p.numel() * p.element_size() for m in bundle.models
                        for p in m.parameters()) / 2**20
        _report_memory(rss_start, params_mb, time.time() - t0, clock)
        if dist.get_rank() == 0:
            log.info("converted %s -> %s (%s) in %.1fs", src, out, cfg.to, time.time() - t0)
            print(f"mvlm convert: wrote {out}")
    finally:
        release_file_maps()  # mapped parameters keep their own maps alive while they live
        destroy_distributed()
    return 0


class _ProbeReader:
    """Stands in for the reader while a mapping's ``load_into`` runs on a meta tensor: records
    the reads it would make, moves no data."""

    def __init__(self, reader: SafetensorsReader) -> None:
        self.reader = reader
        self.calls: list[tuple] = []

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def shape(self, name: str) -> list[int]:
        return self.reader.shape(name)

    def read_into(self, name, out, dim=None, start=None, stop=None) -> None:
        self.calls.append((name, out, dim, start, stop))

    def read(self, *a, **k):
        raise LookupError("not a pass-through mapping")  # needs data: leave it to the loader


@torch.no_grad()
def map_unchanged_params(bundle, src: Path) -> int:
    """Point every CPU parameter that is one contiguous slice of one HF tensor, unchanged
    (same dtype, no interleave, no padding), at that slice of the memory-mapped file.

    Why: ``--to mcore`` only passes such tensors through; copying them into freshly allocated
    parameters first (1.4 GB of new pages for the bench checkpoint) is work a plain
    ``from_pretrained`` (which maps the file) never does. What a mapping would read is found
    by running its own ``load_into`` against a recording reader on a meta tensor, so the
    rule "one read covering the whole parameter" is the mapping's, not a second copy of it.
    The maps are copy-on-write (the file never changes). ``load_hf_weights`` then fills the
    rest; its reads into a mapped parameter are no-ops. Returns the bytes mapped."""
    from mvlm.convert.bridge import param_entries, shard_ctx

    release_file_maps()  # fresh maps: no page an earlier user of a cached map wrote to
    reader = open_hf_reader(src)
    mapped = 0
    for e in param_entries(bundle):
        p = e.param
        if p.device.type != "cpu":
            continue
        probe = _ProbeReader(reader)
        meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
        try:
            e.mapping.load_into(probe, e.idx, shard_ctx(bundle, e.mapping), meta)
        except Exception:  # noqa: BLE001 - any mapping that needs more than reads is skipped
            continue
        if len(probe.calls) != 1:
            continue
        name, out, dim, start, stop = probe.calls[0]
        if out.shape != p.shape or out.storage_offset() or not out.is_contiguous():
            continue
        view = reader.map_view(name, dim, start, stop)
        if view is None or view.dtype != p.dtype or view.shape != p.shape:
            continue
        p.data = view
        mapped += view.nbytes
    return mapped


def _verify(bundle, hf_dir: Path, tol: float, device: str) -> None:
    from mvlm.convert.verify import verify_against_hf

    results = verify_against_hf(bundle, hf_dir, tol=tol, device=device)
    if dist.get_rank() == 0:
        for r in results:
            print(f"verify {r.name:<11} max|dlogits| = {r.max_abs_logits:.3e}  "
                  f"loss mcore {r.loss_mcore:.6f} hf {r.loss_hf:.6f}")


def export_to_hf(bundle, aux_src: Path, out: Path, dtype: torch.dtype | None,
                 overwrite: bool, max_shard_bytes: int = 5 * 2**30,
                 before_publish: Callable[[Path], None] | None = None) -> None:
    """Collective: stream this model into an HF directory, published atomically by rank 0.

    ``before_publish(staging_dir)`` runs on every rank after the files are complete and before
    the rename (e.g. a logits check); if it raises, nothing is published."""
    with staged_publish(out, overwrite=overwrite, before_publish=before_publish) as staging:
        export_hf_weights(bundle, staging, dtype=dtype, max_shard_bytes=max_shard_bytes)
        if dist.get_rank() == 0:
            copy_aux_files(Path(aux_src), staging)
            cfg = bundle.hf_config
            if dtype is not None:
                cfg.dtype = dtype
            cfg.save_pretrained(staging)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (Megatron-Core's checkpoint writer
    forks): on a shared machine a steadier measure of the work than the wall clock."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class PhaseClock:
    """Wall and CPU seconds per named phase (``with clock("read"): ...``), for the report."""

    def __init__(self) -> None:
        self.phases: dict[str, tuple[float, float]] = {}
        self.cpu0 = _cpu_seconds()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        w, c = time.time(), _cpu_seconds()
        try:
            yield
        finally:
            pw, pc = self.phases.get(name, (0.0, 0.0))
            self.phases[name] = (pw + time.time() - w, pc + _cpu_seconds() - c)

    def summary(self) -> str:
        return ",".join(f"{k}:{w:.2f}/{c:.2f}" for k, (w, c) in self.phases.items())


def _report_memory(rss_start: float, params_mb: float, seconds: float,
                   clock: PhaseClock) -> None:
    """One line per rank (rank order): peak RSS above the post-import baseline, next to the
    bytes of this rank's own parameters, so conversion overhead is visible; wall and CPU
    seconds in total and per phase (``phases=name:wall/cpu,...``)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = [dist.get_rank(), rss_start, peak, params_mb, seconds,
           _cpu_seconds() - clock.cpu0, clock.summary()]
    rows: list = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        for r, start, pk, pm, sec, cpu, phases in rows:
            print(f"mvlm convert: rank {r} memory start_mb={start:.0f} peak_mb={pk:.0f} "
                  f"params_mb={pm:.0f} seconds={sec:.2f} cpu_s={cpu:.2f} phases={phases}")
