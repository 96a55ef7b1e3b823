"""`mvlm --help` and `mvlm <command> --help` import neither torch nor Megatron-Core.

Why: a help screen that takes 10-20 s (Megatron-Core and torch at import) and prints CUDA
warnings on a CPU box is the first thing a user sees. Every flag builder therefore lives in a
module whose import is light (standard library and the mvlm flag modules). The import log of
``python -X importtime`` is the evidence: it names every module the process imported.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest

from mvlm.cli import TRAIN_TASKS, build_parser

HEAVY = ("torch", "megatron", "transformers", "datasets", "peft", "safetensors")
HELP_SECONDS = 5.0  # measured 0.1-0.3 s; 10-20 s when torch + Megatron-Core were imported


def _commands() -> list[str]:
    """Every sub-command the parser knows (rlhf/rollout are covered as soon as they exist)."""
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(set(sub.choices) | set(TRAIN_TASKS))


def _imported_modules(stderr: str) -> tuple[list[str], list[str]]:
    """(modules from the -X importtime log, every other stderr line)."""
    modules, other = [], []
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "imported package":  # the log's header line
                modules.append(name)
        elif line.strip():
            other.append(line)
    return modules, other


def _run_help(args: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    # The user's environment, minus anything that would hide a warning.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "mvlm", *args, "--help"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return r, time.perf_counter() - t0


def test_command_list_is_complete() -> None:
    assert {"convert", "encode", "pt", "sft", "export", "demo"} <= set(_commands())


@pytest.mark.parametrize("command", ["", *_commands()])
def test_help_is_light_and_quiet(command: str, tmp_path) -> None:
    r, seconds = _run_help([command] if command else [], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: mvlm {command}".rstrip()), r.stdout[:200]
    modules, other = _imported_modules(r.stderr)
    assert "mvlm.cli" in modules  # the log was read: an empty parse would prove nothing
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"`mvlm {command} --help` imports {heavy[:10]}"
    assert not other, f"`mvlm {command} --help` wrote to stderr:\n" + "\n".join(other[:20])
    assert seconds < HELP_SECONDS, f"`mvlm {command} --help` took {seconds:.1f} s"


def test_flag_builders_are_reexported_from_their_old_homes() -> None:
    """Callers that import the builders from where they used to live keep getting the same
    objects (one definition; no copy that could drift)."""
    import mvlm.data.encode as encode
    import mvlm.data.flags as data_flags
    import mvlm.tuners.train_hooks as hooks

    for name in ("str2bool", "add_data_args", "add_encode_args", "TRUNCATION_STRATEGIES"):
        assert getattr(encode, name) is getattr(data_flags, name), name
    assert callable(hooks.add_adapter_args)


def test_convert_builders_reexported() -> None:
    import mvlm.convert.command as command
    import mvlm.convert.flags as convert_flags
    import mvlm.data.flags as data_flags
    import mvlm.data.template as template

    assert command.add_convert_args is convert_flags.add_convert_args
    assert command.add_layout_args is convert_flags.add_layout_args
    assert template.TRUNCATION_STRATEGIES is data_flags.TRUNCATION_STRATEGIES


def test_lazy_tuners_package_exports() -> None:
    """mvlm.tuners loads its public names on first use; each resolves to its defining module."""
    import mvlm.tuners as tuners
    import mvlm.tuners.model as model
    import mvlm.tuners.peft_io as peft_io

    for name in tuners.__all__:
        owner = peft_io if hasattr(peft_io, name) and not hasattr(model, name) else model
        assert getattr(tuners, name) is getattr(owner, name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tuners.nope  # noqa: B018
