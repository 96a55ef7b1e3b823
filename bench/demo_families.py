"""`mvlm demo --model_type F` for every vision-language family: does each one learn the task?

The demo (mvlm/demo.py) builds a tiny random checkpoint of the family, checks the conversion round
trip, trains it with `mvlm sft` at TP=2 on the coloured-shapes task and measures held-out
accuracy with transformers on the exported model. One demo costs minutes of CPU, so CI runs it
for the default family only (tests/e2e/test_demo.py); this script runs the others, one after the
other, and tabulates accuracy before/after against chance from each run's demo_result.json.

    python bench/demo_families.py [--families llava internvl ...] [--record]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    from mvlm.demo import demo_families

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="*", default=demo_families(), choices=demo_families())
    ap.add_argument("--workdir", default="/tmp/mvlm_bench_demo")
    ap.add_argument("--jobs", type=int, default=1, help="demos run at the same time")
    ap.add_argument("--record", action="store_true", help="append to docs/benchmarks.md")
    a = ap.parse_args()
    Path(a.workdir).mkdir(parents=True, exist_ok=True)

    procs: dict[str, tuple[subprocess.Popen, float]] = {}
    pending = list(a.families)
    done: dict[str, float] = {}
    while pending or procs:
        while pending and len(procs) < a.jobs:
            fam = pending.pop(0)
            out = Path(a.workdir) / fam
            shutil.rmtree(out, ignore_errors=True)  # a crash must not leave an old result
            log = open(Path(a.workdir) / f"{fam}.log", "w")
            procs[fam] = (subprocess.Popen(
                [sys.executable, "-m", "mvlm", "demo", "--model_type", fam, "--output_dir",
                 str(out)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO), time.perf_counter())
        time.sleep(2)
        for fam, (p, t) in list(procs.items()):
            if p.poll() is not None:
                done[fam] = time.perf_counter() - t
                del procs[fam]
                print(f"{fam}: demo exited {p.returncode} after {done[fam]:.0f} s", flush=True)

    rows, failed = [], []
    for fam in a.families:
        res, wall = Path(a.workdir) / fam / "demo_result.json", done[fam]
        if not res.is_file():
            failed.append(fam)
            print(f"{fam}: no demo_result.json; see {Path(a.workdir) / (fam + '.log')}",
                  file=sys.stderr)
            rows.append((fam, None, wall))
            continue
        r = json.loads(res.read_text())
        if not r["ok"]:
            failed.append(fam)
        rows.append((fam, r, wall))

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python bench/demo_families.py" + f" --jobs {a.jobs}" + (" --record" if a.record else "")
    lines = [f"Command: `{cmd}` ({when}; {platform.processor() or 'CPU'}, no GPU; each row is "
             f"one `mvlm demo --model_type F` ({a.jobs} at a time): tiny random checkpoint, "
             "200 SFT steps at TP=2, "
             "held-out accuracy by transformers on the exported model; the demo passes when "
             "accuracy >= 0.6 and gains >= 0.25 over chance and over the untrained model)", "",
             "| family | accuracy before | accuracy after | chance | first -> last loss | "
             "demo passed | wall s |", "|---|---:|---:|---:|---|---|---:|"]
    for fam, r, wall in rows:
        if r is None:
            lines.append(f"| {fam} | - | - | - | - | no (crashed) | {wall:.0f} |")
            continue
        lines.append(f"| {fam} | {r['accuracy_before']:.2f} | {r['accuracy_after']:.2f} | "
                     f"{r['chance']:.2f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
                     f"{'yes' if r['ok'] else 'NO'} | {wall:.0f} |")
    print("\n".join(lines))
    if a.record:
        doc = REPO / "docs" / "benchmarks.md"
        doc.write_text(doc.read_text().rstrip("\n") + "\n\n## `mvlm demo` per family\n\n"
                       + "\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
