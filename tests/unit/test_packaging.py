"""A normal (non-editable) install must ship every subpackage and run the trainer's CLI.

Why: ``setup.py`` uses ``find_packages``, which silently drops any directory without an
``__init__.py``. The editable install used for development still imports such a directory (as a
namespace package), so only a built wheel shows the hole: ``mvlm/train`` was missing and
``mvlm sft`` failed on every pip-installed copy. These tests build the wheel offline from a copy
of the source (so the shared checkout gets no build/ or egg-info debris), install it with
``pip --target`` and run it with the checkout off ``sys.path``; dependencies come from the venv.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "mvlm"
# What setup.py needs to build; everything else in the checkout is irrelevant to the wheel.
BUILD_INPUTS = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md")


def _source_dirs() -> list[Path]:
    """Every directory under mvlm/ that holds .py files: each must be a package in the wheel."""
    return sorted({p.parent for p in PKG.rglob("*.py") if "__pycache__" not in p.parts})


def _pip(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "-q",
           "--disable-pip-version-check"]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(PKG, src / "mvlm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip("wheel", "--no-build-isolation", "-w", str(root / "dist"), str(src), cwd=root)
    (whl,) = (root / "dist").glob("mvlm-*.whl")
    return whl


def test_every_source_dir_is_a_package() -> None:
    """find_packages only sees directories with an __init__.py."""
    missing = [str(d.relative_to(REPO)) for d in _source_dirs() if not (d / "__init__.py").exists()]
    assert not missing, f"add an __init__.py to {missing} or setup.py leaves them out of the wheel"


def test_wheel_holds_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for p in PKG.rglob("*.py")
               if "__pycache__" not in p.parts}
    assert len(_source_dirs()) >= 8  # mvlm + convert data models runtime testing train tuners
    assert {"mvlm/train/__init__.py", "mvlm/train/trainer.py", "mvlm/cli.py"} <= sources
    missing = sorted(sources - names)
    assert not missing, f"{wheel.name} lacks {missing}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "mvlm = mvlm.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# `python -m mvlm sft --help`, then: which file every imported mvlm module came from.
_DRIVER = """
import runpy, sys
sys.argv = ["mvlm", "sft", "--help"]
try:
    runpy.run_module("mvlm", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
else:
    code = 0
files = sorted(m.__file__ for n, m in list(sys.modules.items())
               if n.split(".")[0] == "mvlm" and getattr(m, "__file__", None))
print("\\n".join(["MVLM_FILES"] + files), file=sys.stderr)
sys.exit(code)
"""


def test_installed_wheel_runs_sft_help(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    _pip("install", "--target", str(site), str(wheel), cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    # cwd outside the checkout. PYTHONPATH precedes the editable install's finder (appended to
    # sys.meta_path), but that finder still serves any mvlm subpackage the wheel lacks: so every
    # mvlm module the command imported must come from the installed copy.
    r = subprocess.run([sys.executable, "-c", _DRIVER], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("usage: mvlm sft"), r.stdout[:300]
    for flag in ("--train_type", "--lora_rank", "--dataset", "--tp"):
        assert flag in r.stdout
    files = r.stderr.split("MVLM_FILES", 1)[1].split()
    assert any(f.endswith("mvlm/train/args.py") for f in files), files
    outside = [f for f in files if not Path(f).is_relative_to(site)]
    assert not outside, f"imported from outside the installed wheel: {outside}"
