"""Graceful stop on SIGTERM / SIGUSR1: finish the step, save a checkpoint, exit with a known code.

Who sends what:

* SLURM sends ``SIGUSR1`` ahead of the time limit when the job asks (``#SBATCH --signal=B:USR1@120``
  reaches the batch shell, which forwards it; see ``scripts/slurm/``), and ``SIGTERM`` on
  preemption, ``scancel`` or the time limit itself.
* torchrun forwards the signals it is told to handle to its workers and kills them after a shutdown
  timeout. ``scripts/torchrun_multinode.sh`` sets ``PET_SIGNALS_TO_HANDLE`` (adds SIGUSR1) and
  ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (the grace time) for that.
* A file: when ``MVLM_STOP_FILE`` names a path and that path exists, the rank that sees it asks to
  stop too. The sbatch templates touch it in their trap, so a stop request reaches every node even
  where a signal cannot be forwarded (an old torchrun, a container layer).

The handler only sets a flag (nothing else is safe inside a signal handler). The training loop asks
:meth:`PreemptionHandler.should_stop` once per step, after the optimizer step; that is an all-reduce
(MAX) of the local flags, so every rank stops after the *same* step even though the signal reaches
ranks at different moments. The loop then saves a checkpoint (published atomically like any other)
and exits with :data:`EXIT_PREEMPTED`; the sbatch scripts requeue the job on it and the requeued job
resumes from ``latest``.

Use::

    stopper = PreemptionHandler().install()
    for step in ...:
        train_step()
        if stopper.should_stop():
            save_checkpoint(step)
            return EXIT_PREEMPTED
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable

from mvlm.runtime.compat import shield_checkpoint_writer

# 128 + SIGTERM: what a shell reports for a process ended by SIGTERM, so wrappers that already treat
# "killed by TERM" as "preempted, requeue" keep working. Scripts test `rc -eq 143`.
EXIT_PREEMPTED = 143

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
STOP_FILE_ENV = "MVLM_STOP_FILE"


def _as_signal(s: int | str | signal.Signals) -> signal.Signals:
    if isinstance(s, str):
        name = s.upper() if s.upper().startswith("SIG") else f"SIG{s.upper()}"
        try:
            return signal.Signals[name]
        except KeyError:
            raise ValueError(
                f"unknown signal {s!r}: use a name such as SIGTERM or SIGUSR1") from None
    return signal.Signals(s)


class PreemptionHandler:
    """Catches stop signals, and tells all ranks together whether to stop after this step.

    Args:
        signals: signal names or numbers to catch (default SIGTERM and SIGUSR1).
        stop_file: a path whose existence also requests a stop (default: ``$MVLM_STOP_FILE``).
        device: where the all-reduce flag tensor lives; default ``cuda`` for an NCCL process group,
            else ``cpu``.
    """

    def __init__(self, signals: Iterable[int | str | signal.Signals] = DEFAULT_SIGNALS,
                 stop_file: str | os.PathLike | None = None, device: str | None = None):
        self.signals = tuple(_as_signal(s) for s in signals)
        env_file = os.environ.get(STOP_FILE_ENV)
        self.stop_file = os.fspath(stop_file) if stop_file is not None else (env_file or None)
        self.device = device
        self.received: signal.Signals | None = None  # first signal caught, if any
        self.received_at: float | None = None
        self._requested = False
        self._previous: dict[signal.Signals, object] = {}

    # -- installation -------------------------------------------------------------------------
    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only; idempotent). Returns ``self``."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must be called from the main thread "
                               "(Python delivers signals only there)")
        # megatron-core's lazily spawned checkpoint-writer helper must not die of our stop
        # signals: workaround in mvlm.runtime.compat
        shield_checkpoint_writer(self.signals)
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        first = self.received is None
        if first:
            self.received = signal.Signals(signum)
            self.received_at = time.monotonic()
        self._requested = True
        # os.write, not logging: logging takes locks the interrupted code may hold.
        rank = os.environ.get("RANK", "0")
        msg = (f"[mvlm rank{rank}] caught {signal.Signals(signum).name}: "
               + ("finishing this step, then saving a checkpoint and exiting\n" if first
                  else "already stopping\n"))
        try:
            os.write(2, msg.encode())
        except OSError:
            pass

    # -- queries --------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask to stop as if a signal had arrived (tests, NaN guards, a stop command)."""
        self._requested = True

    def local_stop_requested(self) -> bool:
        """This rank's view only: a signal arrived or the stop file exists. No communication."""
        if not self._requested and self.stop_file and os.path.exists(self.stop_file):
            self._requested = True
        return self._requested

    def should_stop(self, group=None) -> bool:
        """True on every rank when any rank wants to stop. Call at the same point on all ranks.

        One all-reduce of one integer over ``group`` (default: the world) when torch.distributed is
        initialised; a local check otherwise.
        """
        local = self.local_stop_requested()
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return local
        import torch

        device = self.device
        if device is None:
            device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        stop = bool(flag.item())
        if stop:
            self._requested = True
        return stop

    def clear_stop_file(self) -> None:
        """Remove the stop file (rank 0 does this once a stop has been handled, so the requeued
        job does not stop again at its first step)."""
        if self.stop_file:
            try:
                os.remove(self.stop_file)
            except FileNotFoundError:
                pass


# Left behind by a save that was killed (kill -9, node loss) before rank 0 published it:
# ``.checkpoint-<step>.tmp-XXXX`` staging dirs (mvlm.convert.hf_io.make_staging_dir),
# ``.checkpoint-<step>.old-<pid>`` dirs of an interrupted re-publish, ``.latest.tmp-<pid>`` files.
_STALE_PREFIXES = (".checkpoint-",)
_STALE_MARKERS = (".tmp-", ".old-")


def remove_stale_checkpoint_dirs(output_dir: str | os.PathLike) -> list[str]:
    """Delete partial checkpoint directories a killed save left in ``output_dir``.

    They are never named by ``latest`` (publication is a rename after every rank finished), so
    resume ignores them anyway; this reclaims their space. Call on rank 0 at start-up, before any
    save of this run begins (a save in progress in *this* run would look the same). Returns the
    names removed.
    """
    import shutil

    removed: list[str] = []
    try:
        entries = list(os.scandir(output_dir))
    except FileNotFoundError:
        return removed
    for e in entries:
        name = e.name
        stale_dir = name.startswith(_STALE_PREFIXES) and any(m in name for m in _STALE_MARKERS)
        stale_file = name.startswith(".latest.tmp-")
        if stale_dir and e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(name)
        elif stale_file and e.is_file(follow_symlinks=False):
            os.remove(e.path)
            removed.append(name)
    return sorted(removed)
