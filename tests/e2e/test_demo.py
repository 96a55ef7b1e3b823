"""`mvlm demo` run exactly as a user runs it (a fresh process), and its claims checked.

This is the must-show "mvlm demo runs in CI and asserts its accuracy gain": the demo itself
exits non-zero unless the trained model is far above chance, and this test re-checks the numbers
it recorded, so a demo that silently stopped asserting would still fail here.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# The demo is sized for ~3-5 minutes on 2 CPU cores; the limit leaves room for a loaded box.
TIMEOUT_S = 1200


def test_mvlm_demo_trains_and_gains_accuracy() -> None:
    from mvlm.demo import sft_available

    if not sft_available():  # only while the trainer is being merged; never once it is
        pytest.skip("`mvlm sft` is not in this build yet")
    # Our own temp dir, not tmp_path: pytest prunes old basetemps when other pytest sessions
    # start, which deleted this minutes-long run's directory under it on a shared machine.
    with tempfile.TemporaryDirectory(prefix="mvlm_demo_e2e_") as tmp:
        _check_demo(Path(tmp) / "demo")


def _check_demo(out: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mvlm", "demo", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, (
        f"mvlm demo exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-4000:]}")

    result = json.loads((out / "demo_result.json").read_text())
    assert result["ok"] is True
    chance, before, after = result["chance"], result["accuracy_before"], result["accuracy_after"]
    assert after >= 0.6, result
    assert after - chance >= 0.25 and after - before >= 0.25, (before, after, chance)

    # The loss fell: the last quarter of steps averages well below the first few.
    losses = [loss for _, loss in result["losses"]]
    assert len(losses) >= 10
    head, tail = losses[:3], losses[-max(1, len(losses) // 4):]
    assert sum(tail) / len(tail) < 0.5 * sum(head) / len(head), losses

    # What the user is told went somewhere really is there.
    export = Path(result["paths"]["export"])
    assert (export / "config.json").is_file() and any(export.glob("*.safetensors"))
    assert (Path(result["paths"]["data"]) / "val.jsonl").is_file()
    assert "accuracy after training" in proc.stdout
    assert "bit-identical" in proc.stdout  # the conversion round-trip step ran and passed
    assert any(r["correct"] for r in result["answers_after"])
