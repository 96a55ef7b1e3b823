"""pytest imports test files by basename (rootdir-relative "prepend" mode, no __init__.py in the
test folders): two files of the same name in tests/unit, tests/dist and tests/e2e make a
collection error for the whole run. It happened twice in CI (test_internvl.py, test_qwen3_vl.py);
this catches it in a second instead of after a 30-minute CI run."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_file_basenames_are_unique() -> None:
    seen: dict[str, list[str]] = defaultdict(list)
    for f in TESTS.rglob("*.py"):
        if f.name.startswith("test_") and "__pycache__" not in f.parts:
            seen[f.name].append(str(f.relative_to(TESTS)))
    clashes = {k: v for k, v in seen.items() if len(v) > 1}
    assert not clashes, f"rename one of each (e.g. tests/dist/<name>_layouts.py): {clashes}"
