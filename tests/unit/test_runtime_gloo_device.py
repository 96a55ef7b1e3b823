"""mvlm/runtime/gloo_device.py: every gloo group of a process shares one transport device.

Each case runs in a fresh interpreter: the number of gloo event-loop threads is a property of the
whole process, and the pytest process may hold groups of its own. A thread count is the
deterministic trace of the change (each device runs one ``gloo_tcp_loop`` thread that wakes every
10 ms); the collectives check that shared-device groups still compute what they should.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_COUNT_LOOPS = """
def gloo_loops(at_least=1):
    # A loop thread names itself once it runs; on a loaded machine a count taken right after the
    # groups are made can miss one that has not run yet. Wait (at most 20 s) until at least the
    # expected number carry the name, then let 0.3 s pass and count again: the count returned is
    # the settled one, so too many threads still show.
    import os, time

    def count():
        n = 0
        for t in os.listdir("/proc/self/task"):
            try:
                n += open(f"/proc/self/task/{t}/comm").read().startswith("gloo_tcp")
            except OSError:
                pass
        return n

    deadline = time.monotonic() + 20.0
    while count() < at_least and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    return count()
"""

_GROUPS = _COUNT_LOOPS + """
import json, sys
import torch
import torch.distributed as dist
from mvlm.runtime.gloo_device import install
installed = install() if sys.argv[1] == "1" else None
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
groups = [dist.new_group([0]) for _ in range(12)]
sums = []
for i, g in enumerate(groups):
    x = torch.full((4,), float(i))
    dist.all_reduce(x, group=g)
    work = dist.all_reduce(torch.ones(2), group=g, async_op=True)
    work.wait()
    out = [torch.zeros(3)]
    dist.all_gather(out, torch.full((3,), float(i) + 0.5), group=g)
    sums.append([x.sum().item(), out[0].sum().item()])
loops = gloo_loops(1 if installed else 13)
print(json.dumps({"installed": installed, "loops": loops, "sums": sums}))
"""

_MEGATRON = _COUNT_LOOPS + """
import json
from mvlm.runtime.parallel import ParallelLayout, init_distributed
init_distributed(ParallelLayout(tp=1), device="cpu")
import torch.distributed as dist
print(json.dumps({"loops": gloo_loops(), "groups": len(dist.distributed_c10d._world.pg_map)}))
"""


def _run(code: str, *args: str) -> dict:
    if not sys.platform.startswith("linux"):
        pytest.skip("thread names are read from /proc")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_groups_share_one_device_and_compute_the_same() -> None:
    shared = _run(_GROUPS, "1")
    own = _run(_GROUPS, "0")
    assert shared["installed"] is True
    # 13 groups (the world + 12): one loop thread in all instead of one per group.
    assert shared["loops"] == 1
    assert own["loops"] == 13
    assert shared["sums"] == own["sums"] == [[4.0 * i, 3 * (i + 0.5)] for i in range(12)]


def test_mvlm_init_distributed_shares_the_device_on_cpu() -> None:
    # A one-rank CPU run: the world group (in-memory store) and every Megatron-Core group.
    out = _run(_MEGATRON)
    assert out["groups"] >= 10  # Megatron-Core's groups exist (each had a device of its own)
    assert out["loops"] == 1


_SLACK = _COUNT_LOOPS + """
import ctypes, json, os, sys
import torch.distributed as dist
from mvlm.runtime.gloo_device import install
libc = ctypes.CDLL(None)
before = libc.prctl(30, 0, 0, 0, 0)  # PR_GET_TIMERSLACK of this (the creating) thread
if sys.argv[1] == "1":
    install()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
groups = [dist.new_group([0]) for _ in range(3)]
loops = gloo_loops(1 if sys.argv[1] == "1" else 4)
slack = []
for t in os.listdir("/proc/self/task"):
    if open(f"/proc/self/task/{t}/comm").read().startswith("gloo_tcp"):
        try:
            slack.append(int(open(f"/proc/{t}/timerslack_ns").read()))
        except OSError:  # reading another thread's slack needs CAP_SYS_NICE
            slack.append(None)
print(json.dumps({"loops": loops, "slack": slack, "before": before,
                  "after": libc.prctl(30, 0, 0, 0, 0)}))
"""


def test_one_rank_world_loop_thread_gets_timer_slack() -> None:
    """A one-rank world: the one loop thread starts with the raised timer slack (its 10 ms tick
    may fire up to 40 ms late); the thread that created it gets its own slack back. Without the
    installed creator the loop keeps the inherited default."""
    from mvlm.runtime.gloo_device import ONE_RANK_LOOP_SLACK_NS

    shared = _run(_SLACK, "1")
    own = _run(_SLACK, "0")
    assert shared["loops"] == 1 and own["loops"] == 4
    assert shared["before"] == shared["after"] == own["before"] == own["after"]
    if shared["slack"] == [None]:
        pytest.skip("reading another thread's timer slack needs CAP_SYS_NICE here")
    assert shared["slack"] == [ONE_RANK_LOOP_SLACK_NS]
    assert own["slack"] == [own["before"]] * 4


def test_slack_only_for_a_one_rank_world(monkeypatch) -> None:
    """With more than one rank, pairs connect and disconnect through waits on the loop's tick:
    groups of such a world keep gloo's default."""
    from torch.distributed import distributed_c10d as c10d

    from mvlm.runtime import gloo_device

    monkeypatch.setattr(c10d, "is_initialized", lambda: False)
    assert gloo_device._one_rank_world(1)  # the default group of a one-rank world
    assert not gloo_device._one_rank_world(2)  # the default group of a two-rank world
    monkeypatch.setattr(c10d, "is_initialized", lambda: True)
    monkeypatch.setattr(c10d, "get_world_size", lambda *a, **k: 2)
    assert not gloo_device._one_rank_world(1)  # a one-rank subgroup of a two-rank world
    monkeypatch.setattr(c10d, "get_world_size", lambda *a, **k: 1)
    assert gloo_device._one_rank_world(1)
