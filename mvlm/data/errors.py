"""Bad-sample reporting: one exception type that always names the file, the row and the reason.

Why one type: a dataset with a million rows will contain a few broken ones, and the user needs
either a precise stop (``--on_bad_sample error``) or a counted skip (``skip``). Everything the
pipeline can trip over while turning a row into tokens (missing image, tag/media mismatch, unknown
role, over-long sample) is converted into :class:`BadSampleError` at the boundary of
``Template.encode``, so no anonymous exception escapes from a loader worker.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

ON_BAD_SAMPLE_CHOICES = ("error", "skip")


class BadSampleError(ValueError):
    """A dataset row that cannot be turned into a training sample.

    ``reason`` is a short stable key (used for counting), ``detail`` the human explanation.
    ``source`` and ``row`` are filled in as soon as they are known (the template does not know
    which file a row came from; the dataset layer adds it).
    """

    def __init__(self, reason: str, detail: str = "", source: str | None = None,
                 row: int | None = None):
        self.reason = reason
        self.detail = detail
        self.source = source
        self.row = row
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.source or '<unknown dataset>'}"
        if self.row is not None:
            where += f", row {self.row} (0-based)"
        msg = f"bad sample ({where}): {self.reason}"
        if self.detail:
            msg += f": {self.detail}"
        return msg + ". Fix the row, or pass --on_bad_sample skip to skip such rows."

    def with_location(self, source: str | None, row: int | None) -> BadSampleError:
        """Fill in where the row lives (keeps values already set)."""
        if self.source is None:
            self.source = source
        if self.row is None:
            self.row = row
        self.args = (self._message(),)
        return self

    def __reduce__(self):  # picklable across dataset worker processes
        return (BadSampleError, (self.reason, self.detail, self.source, self.row))


@dataclass
class BadSampleCounter:
    """Counts skipped rows by reason and warns once per reason (thread-safe enough for workers)."""

    policy: str = "error"
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        if self.policy not in ON_BAD_SAMPLE_CHOICES:
            raise ValueError(
                f"--on_bad_sample must be one of {ON_BAD_SAMPLE_CHOICES}, got {self.policy!r}")

    def handle(self, err: BadSampleError) -> None:
        """Raise under policy 'error'; otherwise count it and warn the first time a reason shows."""
        if self.policy == "error":
            raise err
        with self._lock:
            first = err.reason not in self.counts
            self.counts[err.reason] += 1
            if first:
                self.examples[err.reason] = str(err)
        if first:
            logger.warning("skipping bad samples with reason %r (first: %s)", err.reason, err)

    def __getstate__(self) -> dict:  # picklable for spawn-started loader workers
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def merge(self, counts: dict) -> None:
        with self._lock:
            self.counts.update(counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "skipped samples: 0"
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"skipped samples: {self.total} ({parts})"
