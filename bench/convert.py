"""Conversion benchmark: wall time, CPU time, throughput and peak memory of HF <-> mcore.

Builds a random Qwen2.5-VL-shaped bf16 checkpoint (real vocabulary size, so the embedding is the
largest tensor, as in real checkpoints), then, in one run and each in its own process:

* disk: the safetensors files read raw (``readinto`` one reused buffer), the speed any loader is
  bounded by. The files were just written, so this is the warm page cache (dropping caches needs
  privileges this machine does not give); every row below reads the same warm files;
* plain load: ``transformers`` ``from_pretrained`` + ``state_dict()``, without a copy (the fair
  memory comparison) and with ``v.clone()`` of every tensor (what the old baseline row did);
* ``mvlm convert --to mcore`` at TP=1 and TP=2, and ``--to hf`` at TP=1 and TP=2 (from the TP=1
  mcore output; each rank loads its shard of it); with ``--before SRC`` each of these also runs
  from an older mvlm tree right before the current one (same run, same load).

Times: "convert" is inside the process, after imports and process-group start-up (what a
converter's work costs), wall and CPU seconds (user+sys, forked writers included; the CPU column
is the steadier one on a shared machine). MB/s = checkpoint bytes / convert wall seconds.
Memory is peak RSS per process above its own post-import RSS; the figure of merit is the
overhead above the bytes of the rank's own parameters (which any converter must hold), compared
with the largest single tensor.

    python bench/convert.py [--workdir /tmp/mvlm_bench_convert] [--before SRC] [--record]
                            [--only hf]

``--only hf`` runs just the ``--to hf`` rows (TP=1 and TP=2; the TP=1 mcore checkpoint they
read is converted first when the workdir has none), for a change that touches only export.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE = textwrap.dedent("""
    import resource, sys, time, psutil, torch, transformers
    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    start = psutil.Process().memory_info().rss / 2**20
    t, c = time.time(), cpu()
    m = transformers.AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    sd = m.state_dict()
    if sys.argv[2] == "clone":
        sd = {k: v.clone() for k, v in sd.items()}
    n = sum(v.numel() for v in sd.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"BASELINE start_mb={start:.0f} peak_mb={peak:.0f} params={n} "
          f"seconds={time.time() - t:.2f} cpu_s={cpu() - c:.2f}")
""")

DISK = textwrap.dedent("""
    import sys, time, torch
    files, n = sys.argv[1:], 0
    buf = torch.empty(256 * 2**20, dtype=torch.uint8).numpy()  # touch it before timing
    buf[:] = 0
    t = time.time()
    for f in files:
        with open(f, "rb", buffering=0) as h:
            while (k := h.readinto(buf)):
                n += k
    print(f"DISK bytes={n} seconds={time.time() - t:.3f}")
""")

RX = re.compile(r"rank (\d+) memory start_mb=(\d+) peak_mb=(\d+) params_mb=(\d+) "
                r"seconds=([\d.]+) cpu_s=([\d.]+) phases=(\S*)")


BUILD = textwrap.dedent("""
    import sys, torch
    from mvlm.testing.tiny_models import build_tiny_checkpoint
    hidden, layers, ffn, vocab = map(int, sys.argv[2:6])
    build_tiny_checkpoint("qwen2_5_vl", sys.argv[1], variant="bench", dtype=torch.bfloat16,
                          hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                          vocab_size=vocab, num_attention_heads=hidden // 128,
                          num_key_value_heads=2)
""")


def build(workdir: Path, args) -> Path:
    """The checkpoint, built in its own process: peak RSS (``ru_maxrss``) survives ``exec``, so
    building it in this process would raise every later row's peak to this one's."""
    hf = workdir / "hf"
    if not (hf / "config.json").exists():
        t = time.time()
        run([sys.executable, "-c", BUILD, str(hf), str(args.hidden), str(args.layers),
             str(args.ffn), str(args.vocab)])
        print(f"built checkpoint in {time.time() - t:.0f}s")
    return hf


def largest_tensor_mb(hf: Path) -> tuple[float, float]:
    from safetensors import safe_open

    sizes = []
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                shape = h.get_slice(k).get_shape()
                n = 1
                for s in shape:
                    n *= s
                sizes.append(n * 2 / 2**20)  # bf16
    return max(sizes), sum(sizes)


def run(cmd: list[str], src: Path = REPO) -> tuple[str, float]:
    """Run ``cmd`` with ``src``'s mvlm first on the path (``-m`` puts the cwd first)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(src))
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=src)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr[-4000:]}")
    return p.stdout, time.time() - t


def disk_speed(hf: Path) -> float:
    """MB/s of a raw read of the checkpoint's files (warm page cache)."""
    out, _ = run([sys.executable, "-c", DISK, *map(str, sorted(hf.glob("*.safetensors")))])
    m = re.search(r"bytes=(\d+) seconds=([\d.]+)", out)
    mbs = int(m.group(1)) / 2**20 / float(m.group(2))
    print(f"disk (warm page cache): {mbs:.0f} MB/s", flush=True)
    return mbs


def baselines(hf: Path, total: float) -> list[tuple]:
    """The transformers rows: from_pretrained + state_dict(), without and with clone()."""
    rows = []
    for mode in ("plain", "clone"):
        out, wall = run([sys.executable, "-c", BASELINE, str(hf), mode])
        m = re.search(r"start_mb=(\d+) peak_mb=(\d+) params=(\d+) seconds=([\d.]+) "
                      r"cpu_s=([\d.]+)", out)
        name = ("transformers from_pretrained + state_dict()" if mode == "plain" else
                "transformers from_pretrained + state_dict() + clone()")
        rows.append((name, wall, float(m.group(4)), float(m.group(5)),
                     int(m.group(2)) - int(m.group(1)), total, ""))
        print(rows[-1], flush=True)
    return rows


def mvlm(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "mvlm", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "mvlm", *args]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/mvlm_bench_convert")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=6144)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--before", default=None,
                    help="an older mvlm source tree (e.g. `git archive <commit>` unpacked): its "
                         "--to mcore / --to hf rows run too, each right before the current one")
    ap.add_argument("--record", action="store_true",
                    help="replace the Conversion section of docs/benchmarks.md")
    ap.add_argument("--only", choices=("all", "hf"), default="all",
                    help="hf: only the --to hf rows (skip disk, baseline and --to mcore rows)")
    args = ap.parse_args()
    if args.record and args.only != "all":
        ap.error("--record replaces the whole Conversion section: run every row (--only all)")
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    hf = build(wd, args)
    big, total = largest_tensor_mb(hf)
    print(f"checkpoint: {total:.0f} MB bf16, largest tensor {big:.0f} MB", flush=True)

    disk_mbs = float("nan")
    rows = []  # name, process wall, convert wall, convert cpu, rss above start, params MB
    if args.only == "all":
        disk_mbs = disk_speed(hf)
        rows += baselines(hf, total)

    def convert(label: str, nproc: int, cli: list[str]) -> None:
        trees = ([(" (before)", Path(args.before))] if args.before else []) + [("", REPO)]
        dest = Path(cli[cli.index("--output") + 1])
        for tag, src in trees:
            # Every row writes into a freshly removed output: the page-cache pages of the last
            # row's copy are free again before it starts, not released behind it by the
            # publish step. In this VM, writing into memory the guest has not used before costs
            # several times more than into memory it has freed (336 MB written three times in
            # a row: 1.59, 0.62, 0.09 CPU s), so without this the rows' order decided the write
            # phase more than the code did.
            shutil.rmtree(dest, ignore_errors=True)
            out, wall = run(mvlm(nproc, ["convert", *cli, "--overwrite"]), src)
            for r, start, peak, params, sec, cpu, phases in RX.findall(out):
                rows.append((f"{label}{tag}, rank {r}", wall, float(sec), float(cpu),
                             int(peak) - int(start), int(params), phases))
                print(rows[-1], flush=True)

    mc = {tp: wd / f"mcore_tp{tp}" for tp in (1, 2)}
    for tp in (1, 2):
        if args.only == "hf" and (tp == 2 or (mc[1] / "mvlm_meta.json").exists()):
            continue
        convert(f"mvlm convert --to mcore (TP={tp})", tp,
                ["--to", "mcore", "--model", str(hf), "--output", str(mc[tp]), "--tp", str(tp),
                 "--torch_dtype", "bfloat16"])
    for tp in (1, 2):
        convert(f"mvlm convert --to hf (TP={tp})", tp,
                ["--to", "hf", "--model", str(mc[1]), "--output", str(wd / f"hf_back_tp{tp}"),
                 "--tp", str(tp)])

    lines = ["| step | process wall s | convert wall s | convert CPU s | MB/s (wall) | "
             "peak RSS above start, MB | rank's params, MB | overhead above params, MB "
             "(x largest tensor) | phases wall/CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    if args.only == "all":
        lines.append(f"| disk: raw read of the safetensors files (warm page cache) | | | | "
                     f"{disk_mbs:.0f} | | | | |")
    for name, wall, work, cpu, above, params, phases in rows:
        over = above - params
        lines.append(f"| {name} | {wall:.1f} | {work:.2f} | {cpu:.2f} | {total / work:.0f} | "
                     f"{above:.0f} | {params:.0f} | {over:.0f} ({over / big:.2f}x) | "
                     f"{phases.replace(',', ', ')} |")
    table = "\n".join(lines)
    print(table)
    result = {"total_mb": total, "largest_tensor_mb": big, "disk_mb_s": disk_mbs,
              "rows": rows, "date": str(date.today())}
    (wd / "result.json").write_text(json.dumps(result, indent=2))
    if args.record:
        record(args, total, big, table)


def record(args, total: float, big: float, table: str) -> None:
    """Replace the Conversion section of docs/benchmarks.md (up to the next ``## ``)."""
    doc = REPO / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = (
        f"## Conversion ({date.today()}, 2-core CPU shared with other jobs, no GPU)\n\n"
        f"Command: `python bench/convert.py --record` (Qwen2.5-VL-shaped, hidden "
        f"{args.hidden}, {args.layers} layers, vocab {args.vocab}; {total:.0f} MB bf16, "
        f"largest tensor {big:.0f} MB). One run; every row is its own process. Peak RSS is "
        "per process, above its RSS after imports; 'overhead' subtracts the rank's own "
        "parameters, which any converter must hold.\n\n" + table + "\n\n")
    m = re.search(r"^## Conversion.*?(?=^## |\Z)", text, flags=re.S | re.M)
    text = text[:m.start()] + section + text[m.end():] if m else text + "\n" + section
    doc.write_text(text)


if __name__ == "__main__":
    main()
