"""Atomic, collective publication of an output directory, and the fault-injection pause points.

Every directory mvlm writes (``mvlm convert`` outputs, training checkpoints, PEFT adapters, HF
exports) follows one protocol, implemented once here by :func:`staged_publish`:

1. rank 0 refuses to clobber an existing output (unless ``overwrite``) and creates a hidden
   staging directory ``.<name>.tmp-XXXX`` next to it; its path is broadcast to every rank;
2. every rank writes its part into the staging directory (the ``with`` body);
3. barrier; optional ``before_publish(staging)`` on every rank (e.g. a logits check);
4. rank 0 renames the staging directory into place (:func:`publish_dir`), then runs
   ``after_publish(final)`` (e.g. rewrite ``latest``, prune old checkpoints); barrier;
5. on any exception rank 0 deletes the staging directory and the error propagates.

So a reader never sees a directory that looks complete but is not: a process killed before step
4 leaves only the hidden staging directory, which no reader picks up.

Fault injection (for tests; inert unless set): ``MVLM_FAULT_PAUSE_AT=<point>`` makes the first
save of the process stop at that named point, write a JSON marker file at ``MVLM_FAULT_MARKER``
and wait there until the marker is deleted (the save then goes on) or the process is killed.
A test waits for the marker and kills: the kill provably lands at that point, with no sleeps or
polling races. Points, in the order a save reaches them:

* ``mid_write``: the first weight file is complete (torch_dist files of a Megatron checkpoint, the
  first safetensors shard of an HF export, the adapter weights of a PEFT dir), the rest is not;
* ``staged``: every rank has written everything, nothing is published yet;
* ``before_latest``: the directory is renamed into place; ``after_publish`` (a training run's
  ``latest`` pointer) has not run yet.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

PAUSE_ENV = "MVLM_FAULT_PAUSE_AT"
MARKER_ENV = "MVLM_FAULT_MARKER"
PAUSE_POINTS = ("mid_write", "staged", "before_latest")

_paused = False  # a process pauses once: a tester who deletes the marker wants the run to go on


def fault_point(point: str, where: Path | None = None) -> None:
    """Pause here if ``MVLM_FAULT_PAUSE_AT`` names ``point`` (see the module docstring).

    Costs one environment lookup when the variable is unset."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    global _paused
    if point not in PAUSE_POINTS:
        raise ValueError(f"fault_point({point!r}): not one of {PAUSE_POINTS}")
    if wanted not in PAUSE_POINTS:
        raise ValueError(f"{PAUSE_ENV}={wanted!r} is not a pause point: use one of "
                         f"{', '.join(PAUSE_POINTS)}, or unset it")
    if wanted != point or _paused:
        return
    marker = os.environ.get(MARKER_ENV)
    if not marker:
        raise ValueError(f"{PAUSE_ENV}={wanted} needs {MARKER_ENV}=<file>: the marker the test "
                         "waits for before it kills the job")
    _paused = True
    marker_path = Path(marker)
    info = {"point": point, "rank": _rank(None), "pid": os.getpid(),
            "where": str(where) if where is not None else None}
    tmp = marker_path.with_name(f".{marker_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(info) + "\n")
    os.replace(tmp, marker_path)  # the test never reads a half-written marker
    while marker_path.exists():
        time.sleep(0.1)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank(group) -> int:
    return dist.get_rank(group) if _dist_on() else 0


def _barrier(group) -> None:
    if _dist_on():
        dist.barrier(group=group)


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a finished output unless asked; the real write goes to a temp dir."""
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {out} already exists: pass --overwrite to replace it, or choose "
            "another --output")


def make_staging_dir(out: Path) -> Path:
    """A hidden ``.<name>.tmp-XXXX`` next to ``out`` (same filesystem, so the rename is atomic;
    the prefix is what :mod:`mvlm.train.signals` recognises as a stale partial save)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def publish_dir(staging: Path, out: Path) -> None:
    """Atomically make ``staging`` appear as ``out`` (rename within one filesystem)."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)


def _make_staging_everywhere(out: Path, overwrite: bool, group) -> Path:
    """Rank 0 checks ``out`` and makes the staging dir; every rank gets its path, or the same
    clear error (instead of the other ranks hanging in the broadcast)."""
    msg: list = [None, None]
    if _rank(group) == 0:
        try:
            prepare_output_dir(out, overwrite)
            msg[0] = str(make_staging_dir(out))
        except FileExistsError as e:
            msg[1] = str(e)
    if _dist_on():
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(msg, src=src, group=group)
    if msg[1] is not None:
        raise FileExistsError(msg[1])
    return Path(msg[0])


@contextmanager
def staged_publish(final_dir: str | os.PathLike, *, overwrite: bool, group=None,
                   before_publish: Callable[[Path], None] | None = None,
                   after_publish: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Collective (over ``group``, default: all ranks; also works without torch.distributed):
    yield the staging directory to write into, publish it as ``final_dir`` when the body
    succeeded on this rank, delete it on failure. See the module docstring for the steps."""
    out = Path(final_dir)
    staging = _make_staging_everywhere(out, overwrite, group)
    try:
        yield staging
        _barrier(group)
        fault_point("staged", staging)
        if before_publish is not None:
            before_publish(staging)
        if _rank(group) == 0:
            publish_dir(staging, out)
            fault_point("before_latest", out)
            if after_publish is not None:
                after_publish(out)
        _barrier(group)
    except BaseException:
        if _rank(group) == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
