"""Bad-sample reporting: one exception type that always names the file, the row and the reason.

Why one type: a dataset with a million rows will contain a few broken ones, and the user needs
either a precise stop (``--on_bad_sample error``) or a counted skip (``skip``). Everything the
pipeline can trip over while turning a row into tokens (missing image, tag/media mismatch, unknown
role, over-long sample) is converted into :class:`BadSampleError` at the boundary of
``Template.encode``, so no anonymous exception escapes from a loader worker.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections import Counter
from typing import Any

logger = logging.getLogger(__name__)

ON_BAD_SAMPLE_CHOICES = ("error", "skip")


class BadSampleError(ValueError):
    """A dataset row that cannot be turned into a training sample.

    ``reason`` is a short stable key (used for counting), ``detail`` the human explanation.
    ``source``, ``row`` (0-based index among the file's rows) and ``line`` (1-based line where
    the row starts, for text files) are filled in as soon as they are known (the template does
    not know which file a row came from; the dataset layer adds it). Messages name the line
    when there is one (what an editor shows), else the row index (parquet / arrow / saved
    datasets, where ``ds[row]`` finds it).
    """

    def __init__(self, reason: str, detail: str = "", source: str | None = None,
                 row: int | None = None, line: int | None = None):
        self.reason = reason
        self.detail = detail
        self.source = source
        self.row = row
        self.line = line
        super().__init__(self._message())

    def where(self) -> str:
        """``FILE, line N`` (text files) or ``FILE, row N (0-based)``."""
        where = f"{self.source or '<unknown dataset>'}"
        if self.line is not None:
            where += f", line {self.line}"
        elif self.row is not None:
            where += f", row {self.row} (0-based)"
        return where

    def short(self) -> str:
        """``FILE, line N: reason: detail`` (what a skip warning shows)."""
        return f"{self.where()}: {self.reason}" + (f": {self.detail}" if self.detail else "")

    def _message(self) -> str:
        msg = f"bad sample ({self.where()}): {self.reason}"
        if self.detail:
            msg += f": {self.detail}"
        return msg + ". Fix the row, or pass --on_bad_sample skip to skip such rows."

    def with_location(self, source: str | None, row: int | None,
                      line: int | None = None) -> BadSampleError:
        """Fill in where the row lives (keeps values already set)."""
        if self.source is None:
            self.source = source
        if self.row is None:
            self.row = row
        if getattr(self, "line", None) is None:
            self.line = line
        self.args = (self._message(),)
        return self

    def __reduce__(self):  # picklable across dataset worker processes
        return (BadSampleError, (self.reason, self.detail, self.source, self.row, self.line))


class DatasetFileError(ValueError):
    """A dataset file that cannot be read at all (not one bad row): stops under any policy."""


def _remove_spool(path: str, owner: int) -> None:
    if os.getpid() == owner:  # a forked loader worker holds a copy of the finalizer: not it
        shutil.rmtree(path, ignore_errors=True)


class BadSampleCounter:
    """Counts skipped rows by reason and warns once per reason.

    A row is counted once however often it is visited (lazy datasets meet a bad row again in
    every epoch, and again when a neighbour's retry walks over it): rows with a known location
    are counted by (source, row). ``merge`` adds counts that are already per distinct row (the
    eager encoder's).

    ``share_with_workers=True`` (the torch datasets that DataLoader workers copy): a worker
    process writes what it skipped to a spool directory created here, and ``counts`` in the
    process that made the counter adds those up, so ``--dataloader_num_workers > 0`` does not
    hide skips in the workers. Files, not queues: they work with fork and spawn workers alike
    and never block a worker.
    """

    def __init__(self, policy: str = "error", *, share_with_workers: bool = False):
        if policy not in ON_BAD_SAMPLE_CHOICES:
            raise ValueError(
                f"--on_bad_sample must be one of {ON_BAD_SAMPLE_CHOICES}, got {policy!r}")
        self.policy = policy
        self.examples: dict[str, str] = {}
        self._keyed: dict[str, set] = {}  # reason -> {(source, row)}
        self._unkeyed: Counter = Counter()
        self._lock = threading.Lock()
        self._owner = self._pid = os.getpid()
        self._spool = None
        if share_with_workers:
            self._spool = tempfile.mkdtemp(prefix="mvlm-bad-samples-")
            weakref.finalize(self, _remove_spool, self._spool, self._owner)

    def handle(self, err: BadSampleError) -> None:
        """Raise under policy 'error'; otherwise count it and warn the first time a reason shows."""
        if self.policy == "error":
            raise err
        self.count(err)

    def count(self, err: BadSampleError) -> None:
        """Count ``err`` whatever the policy (rows dropped on purpose, e.g. truncation delete)."""
        with self._lock:
            if os.getpid() != self._pid:  # first use in a loader worker: count its own skips
                self._pid = os.getpid()
                self._keyed, self._unkeyed, self.examples = {}, Counter(), {}
                self._spool_file = f"{self._pid}-{uuid.uuid4().hex}.json"  # pids get reused
            first = err.reason not in self._keyed and err.reason not in self._unkeyed
            if err.row is not None:
                keys = self._keyed.setdefault(err.reason, set())
                key = (str(err.source), int(err.row))
                if key in keys:
                    return
                keys.add(key)
            else:
                self._unkeyed[err.reason] += 1
            if first:
                self.examples[err.reason] = err.short()
            if self._pid != self._owner and self._spool:
                self._write_spool()
        if first:
            logger.warning("skipping bad samples with reason %r (first: %s)", err.reason,
                           err.short())

    def _write_spool(self) -> None:
        state = {"keyed": {r: sorted(k) for r, k in self._keyed.items()},
                 "unkeyed": dict(self._unkeyed), "examples": self.examples}
        path = os.path.join(self._spool, self._spool_file)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)  # the owner never reads a half-written file

    def _worker_states(self) -> list[dict[str, Any]]:
        if not self._spool or os.getpid() != self._owner or not os.path.isdir(self._spool):
            return []
        states = []
        for name in sorted(os.listdir(self._spool)):
            if name.endswith(".json"):
                with open(os.path.join(self._spool, name)) as f:
                    states.append(json.load(f))
        return states

    def __getstate__(self) -> dict:  # picklable for spawn-started loader workers
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def merge(self, counts: dict) -> None:
        """Add per-reason counts of distinct rows counted elsewhere."""
        with self._lock:
            self._unkeyed.update(counts)

    @property
    def counts(self) -> Counter:
        """Skipped rows by reason, this process's and (in the owner) its loader workers'."""
        keyed = {r: set(k) for r, k in self._keyed.items()}
        unkeyed = Counter(self._unkeyed)
        for st in self._worker_states():
            for r, keys in st["keyed"].items():
                keyed.setdefault(r, set()).update(tuple(k) for k in keys)
            unkeyed.update(st["unkeyed"])
            for r, ex in st["examples"].items():
                self.examples.setdefault(r, ex)
        out = Counter(unkeyed)
        for r, keys in keyed.items():
            out[r] += len(keys)
        return +out

    @property
    def shares_with_workers(self) -> bool:
        return self._spool is not None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        counts = self.counts
        if not counts:
            return "skipped samples: 0"
        parts = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        return f"skipped samples: {sum(counts.values())} ({parts})"
