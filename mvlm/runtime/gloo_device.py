"""One gloo transport device per process, shared by every gloo process group.

Why: torch builds each gloo process group with a TCP device of its own, and every device runs an
event-loop thread that wakes every 10 ms even when nothing is sent. Megatron-Core's
``initialize_model_parallel`` creates a few dozen groups (TP, PP, DP, CP, EP, their products, the
gloo copies of the data-parallel groups), and on CPU every one of them is gloo: a one-rank mvlm
run carries ~60 loop threads, measured at about 1.8 ms of CPU per second per group while idle
(30 idle groups: 54 ms/s), i.e. CPU taken from the training step, the benchmark's transformers
side and, on a 2-core machine running 2-4 ranks, from the other ranks. A gloo device can serve
many contexts (torch's own group split hands its parent's device to the child), so every group
created after :func:`install` takes the device of a live gloo group of the process (one loop
thread per process). The first one is the device torch would have built
(``ProcessGroupGloo.create_default_device``: the host's address, or ``GLOO_SOCKET_IFNAME``), so
multi-node runs resolve the same interface; like torch's own, it is held only by the groups.

In a one-rank world the loop has nothing to serve: no pair ever connects, so its only work is
the 10 ms ``epoll_wait`` tick (about 60 wake-ups and 2.5-3.6 ms of CPU per 0.6 s training step
on the 2-core test box). There the device is created while the creating thread's timer slack is
raised to :data:`ONE_RANK_LOOP_SLACK_NS` (``prctl(PR_SET_TIMERSLACK)``, then restored); the loop
thread inherits it, so the kernel may fire its timeout up to 40 ms late: about 15 wake-ups and
0.4-0.7 ms per step. Events still wake it at once: the deferred-work pipe and the listening socket
are file descriptors in the same ``epoll`` set, and the tick is only what ``unregisterDescriptor``
and shutdown wait for (no pair exists to unregister; shutdown waits up to 50 ms instead of 10).
With more than one rank, pairs connect and disconnect through those waits, so the slack is left
as it is.

Nothing else changes: the groups' ranks, timeouts, worker threads and names are those torch
gives them; collectives, their order and results are untouched. A caller passing its own gloo
options (``pg_options``) keeps them. Where torch's backend registry does not have the layout this
was written against (``Backend._plugins`` holding a creator for ``gloo``), nothing is installed
and groups get their own devices as before (:func:`install` returns False).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import sys
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


ONE_RANK_LOOP_SLACK_NS = 40_000_000  # the loop thread's timer slack in a one-rank world
_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30  # <linux/prctl.h>


@contextlib.contextmanager
def thread_timer_slack(ns: int) -> Iterator[bool]:
    """Set the calling thread's timer slack to ``ns`` inside the block (threads created there
    inherit it), then restore it; yields whether it was set (Linux only, no privilege needed)."""
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None
    if prctl is not None:
        prctl.restype = ctypes.c_int
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                          ctypes.c_ulong]
        old = prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0)
        if old < 0 or prctl(_PR_SET_TIMERSLACK, ns, 0, 0, 0) != 0:
            prctl = None
    if prctl is None:
        yield False
        return
    try:
        yield True
    finally:
        prctl(_PR_SET_TIMERSLACK, old, 0, 0, 0)


def shared_device(one_rank_world: bool = False) -> Any:
    """A gloo device for a new group: the one a live gloo group of this process already uses,
    else a new default one (its loop thread with a raised timer slack in a one-rank world).

    Nothing here holds the device: the groups do (each group's options keep a reference), so
    it lives exactly as long as the groups using it, as a device of torch's own does, and
    ``destroy_process_group`` frees it in the calling thread rather than leaving it to the
    interpreter's shutdown."""
    import torch
    from torch.distributed import ProcessGroupGloo
    from torch.distributed import distributed_c10d as c10d

    for pg in list(getattr(getattr(c10d, "_world", None), "pg_map", {})):
        try:
            backend = pg._get_backend(torch.device("cpu"))
        except (RuntimeError, AttributeError, ValueError):
            continue
        devices = getattr(getattr(backend, "options", None), "_devices", None)
        if isinstance(backend, ProcessGroupGloo) and devices:
            return devices[0]
    if not one_rank_world:
        return ProcessGroupGloo.create_default_device()
    with thread_timer_slack(ONE_RANK_LOOP_SLACK_NS) as raised:
        device = ProcessGroupGloo.create_default_device()
    log.debug("one-rank world: gloo loop thread timer slack %s",
              f"{ONE_RANK_LOOP_SLACK_NS} ns" if raised else "unchanged (no prctl)")
    return device


def _one_rank_world(group_size: int) -> bool:
    """Whether a group of ``group_size`` ranks belongs to a one-rank world (while the default
    group is being created, its size is the world's)."""
    from torch.distributed import distributed_c10d as c10d

    if group_size != 1:
        return False
    return not c10d.is_initialized() or c10d.get_world_size() == 1


def _sharing(creator: Any) -> Any:
    if getattr(creator, "_mvlm_shared_device", False):
        return creator

    @functools.wraps(creator)
    def create(opts: Any, backend_options: Any) -> Any:
        from torch.distributed import ProcessGroupGloo

        if backend_options is not None:  # the caller chose its own devices / threads
            return creator(opts, backend_options)
        options = ProcessGroupGloo._Options()
        options._timeout = opts.timeout
        options._devices = [shared_device(one_rank_world=_one_rank_world(opts.group_size))]
        if opts.enable_reconfigure:
            options.enable_reconfigure = True
        pg = ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, options)
        pg.options.global_ranks_in_group = opts.global_ranks_in_group
        pg.options.group_name = opts.group_id
        return pg

    create._mvlm_shared_device = True  # type: ignore[attr-defined]
    return create


def install() -> bool:
    """Make gloo groups created from now on share one device; True when installed."""
    from torch.distributed import distributed_c10d as c10d

    backend = getattr(c10d, "Backend", None)
    plugins = getattr(backend, "_plugins", None)
    if not isinstance(plugins, dict) or not c10d.is_gloo_available():
        log.info("gloo device sharing not installed: torch's backend registry differs")
        return False
    ensure = getattr(backend, "_ensure_backend_registered", None)
    if "GLOO" not in plugins and callable(ensure):
        ensure("gloo")
    plugin = plugins.get("GLOO")
    if plugin is None or not hasattr(plugin, "creator_fn") or not plugin.extended_api:
        log.info("gloo device sharing not installed: no extended-API gloo creator registered")
        return False
    plugins["GLOO"] = plugin._replace(creator_fn=_sharing(plugin.creator_fn))
    return True
