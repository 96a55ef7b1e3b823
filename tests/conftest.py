"""Session-wide fixtures. Tiny checkpoints are built once per session and reused read-only."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(family, variant="default", **overrides) -> Path, cached per argument set."""
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    cache: dict = {}

    def get(family: str, variant: str = "default", **overrides) -> Path:
        key = (family, variant, tuple(sorted(overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{family}_{variant}")
            cache[key] = build_tiny_checkpoint(family, d / "hf", variant=variant, **overrides)
        return cache[key]

    return get


# ---- where CI time goes, independent of machine load (issue 16) ----------------------------------
# Wall-clock durations (--durations) swell when other jobs share the 2 cores; CPU seconds of the
# test process and of its waited-for children (torchrun ranks, mvlm subprocesses) do not, so the
# per-file CPU totals printed at the end are what to trim against. Each test's CPU seconds ride on
# its teardown report (user_properties), so the totals also add up under pytest-xdist, where the
# tests run in worker processes and the summary is printed by the controller.
_CPU_BY_FILE: dict[str, float] = {}
_CPU_START: dict[str, float] = {}


def _cpu_now() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _CPU_START[item.nodeid] = _cpu_now()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "teardown" and item.nodeid in _CPU_START:
        cpu = _cpu_now() - _CPU_START.pop(item.nodeid)
        outcome.get_result().user_properties.append(("cpu_s", cpu))


def pytest_runtest_logreport(report):
    if report.when != "teardown":
        return
    for k, v in report.user_properties:
        if k == "cpu_s":
            f = report.nodeid.split("::")[0]
            _CPU_BY_FILE[f] = _CPU_BY_FILE.get(f, 0.0) + v


def pytest_terminal_summary(terminalreporter):
    if not _CPU_BY_FILE:
        return
    top = sorted(_CPU_BY_FILE.items(), key=lambda kv: -kv[1])
    tr = terminalreporter
    total = sum(_CPU_BY_FILE.values())
    tr.write_sep("=", f"CPU seconds by test file (self + children), total {total:.0f}")
    for f, s in top[:40]:
        tr.write_line(f"{s:9.1f}  {f}")


@pytest.fixture
def one_rank(tmp_path):
    """A one-rank gloo default group for code that needs ``torch.distributed`` (DCP, Megatron's
    dist-checkpointing) inside a plain test process; skipped where a group already exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()
