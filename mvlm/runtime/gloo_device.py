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

Nothing else changes: the groups' ranks, timeouts, worker threads and names are those torch
gives them; collectives, their order and results are untouched. A caller passing its own gloo
options (``pg_options``) keeps them. Where torch's backend registry does not have the layout this
was written against (``Backend._plugins`` holding a creator for ``gloo``), nothing is installed
and groups get their own devices as before (:func:`install` returns False).
"""
from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


def shared_device() -> Any:
    """A gloo device for a new group: the one a live gloo group of this process already uses,
    else a new default one.

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
    return ProcessGroupGloo.create_default_device()


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
        options._devices = [shared_device()]
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
