"""Reward functions for GRPO: the registry, ms-swift's built-ins, ``--external_plugins``.

The interface is ms-swift's, so the users' plugin files run unchanged: a reward function is an
``ORM`` subclass (or any callable) registered by name in ``orms``; it is called once per rollout
batch as ``func(completions, **kwargs)`` and returns one float per completion (``None`` = "does not
apply to this completion": it is left out of that completion's reward, as in ms-swift and TRL).
``kwargs`` holds every dataset column of the completion's row (e.g. ``solution``), one list entry
per completion, plus ``response_token_ids`` (the completion's token ids) and ``trainer_state``.
A function without ``**kwargs`` gets only the keyword arguments it names.

Built-ins (``--reward_funcs``), with ms-swift's flags and defaults:

* ``accuracy``: math_verify equivalence of the completion (its ``<answer>...</answer>`` part when
  present) with the ``solution`` column; 1.0 or 0.0 (0.0 when the solution does not parse).
* ``format``: 1.0 when the completion is exactly ``<think>...</think>`` then (whitespace)
  ``<answer>...</answer>`` and nothing after it.
* ``cosine`` (arXiv 2502.03373): length-shaped accuracy. With ``t`` = completion tokens and
  ``L`` = ``--cosine_max_len`` (default ``--max_completion_length``), the reward moves along half a
  cosine from its value at ``t = 0`` to its value at ``t >= L``: ``--cosine_min_len_value_correct``
  (1.0) to ``--cosine_max_len_value_correct`` (0.5) for correct answers,
  ``--cosine_min_len_value_wrong`` (-0.5) to ``--cosine_max_len_value_wrong`` (0.0) for wrong ones.
  ``t`` is capped at ``L`` (ms-swift lets the cosine swing back up past ``L``).
* ``repetition`` (same paper): ``(1 - distinct n-grams / n-grams) * --repetition_max_penalty``
  (-1.0) over lower-cased whitespace words, ``n`` = ``--repetition_n_grams`` (3); 0 for
  completions shorter than ``n`` words.
* ``soft_overlong`` (DAPO): 0 up to ``--soft_max_length - --soft_cache_length`` tokens, then
  linearly down to -1 at ``--soft_max_length`` (default ``--max_completion_length``), -1 beyond.

``--reward_model DIR ...``: each reward-model export (``mvlm rlhf --rlhf_type rm``) is one more
function, named by the directory's basename, scoring prompt + completion token ids
(:class:`RewardModelReward`); they come after ``--reward_funcs`` in the weights.

``--reward_weights`` gives one weight per function (default 1 each). Errors are located: a function
that raises, returns the wrong number of values, a non-number, NaN or inf stops the run with the
function's name and origin, or with ``--on_reward_error skip`` its values for that batch become
"not scored" and are counted per function (``RewardResult.skipped``).

``--external_plugins file.py`` executes each file once, before the names are looked up. When
ms-swift is not installed, the file's ``from swift.plugin import ORM, orms`` (or ms-swift 4's
``from swift.rewards import ...``) is served by an import shim: a meta-path finder that exists
only while the plugin file is being executed and provides the modules ``swift``,
``swift.plugin`` and ``swift.rewards`` with exactly ``ORM``, ``AsyncORM`` and ``orms`` -- mvlm's
own base classes and registry, so ``orms['name'] = Class`` registers into mvlm. Afterwards the
finder and those module entries are removed again, so nothing else in the process can mistake
mvlm for ms-swift. With ms-swift installed, the real modules are used and the names the file adds
to ms-swift's ``orms`` are copied into mvlm's registry.
"""
from __future__ import annotations

import asyncio
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("mvlm.rl")

ON_REWARD_ERROR = ("raise", "skip")


class ORM:
    """Base class of outcome reward functions (ms-swift's interface).

    Subclasses define ``__call__(self, completions, **kwargs) -> list[float | None]``;
    ``args`` is the run's configuration (flag values as attributes)."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        self.args = args

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float | None]:
        raise TypeError(f"{type(self).__name__} is registered as a reward function but does not "
                        "define __call__(self, completions, **kwargs)")


class AsyncORM(ORM):
    """An ORM whose ``__call__`` is a coroutine (for rewards that wait on I/O)."""

    async def __call__(self, completions: list[str], **kwargs: Any) -> list[float | None]:
        raise TypeError(f"{type(self).__name__} is registered as a reward function but does not "
                        "define async __call__(self, completions, **kwargs)")


# name -> ORM subclass or plain callable. Plugins write into this very dict.
orms: dict[str, Any] = {}
_ORIGIN: dict[str, str] = {}  # name -> where it came from, for error messages


def register(name: str, func: Any, origin: str = "mvlm built-in") -> None:
    orms[name] = func
    _ORIGIN[name] = origin


# --------------------------------------------------------------------------- configuration

@dataclass
class RewardConfig:
    """Reward flags (ms-swift names and defaults)."""

    reward_funcs: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    reward_model: list[str] = field(default_factory=list)
    external_plugins: list[str] = field(default_factory=list)
    on_reward_error: str = "raise"
    max_completion_length: int = 512
    cosine_min_len_value_wrong: float = -0.5
    cosine_max_len_value_wrong: float = 0.0
    cosine_min_len_value_correct: float = 1.0
    cosine_max_len_value_correct: float = 0.5
    cosine_max_len: int | None = None
    repetition_n_grams: int = 3
    repetition_max_penalty: float = -1.0
    soft_max_length: int | None = None
    soft_cache_length: int | None = None

    def __post_init__(self) -> None:
        for d in self.reward_model:
            check_reward_model_dir(d)
        if self.on_reward_error not in ON_REWARD_ERROR:
            raise ValueError(f"--on_reward_error {self.on_reward_error!r}: choose raise (stop at "
                             "the first bad reward) or skip (count it and leave it unscored)")
        if self.cosine_max_len is None:
            self.cosine_max_len = self.max_completion_length
        if self.soft_max_length is None:
            self.soft_max_length = self.max_completion_length
        if self.cosine_max_len <= 0:
            raise ValueError(f"--cosine_max_len {self.cosine_max_len} must be > 0")
        if self.repetition_n_grams < 1:
            raise ValueError(f"--repetition_n_grams {self.repetition_n_grams} must be >= 1")
        if "soft_overlong" in self.reward_funcs:
            if self.soft_cache_length is None:
                raise ValueError("--reward_funcs soft_overlong needs --soft_cache_length (the "
                                 "length of the penalty ramp before --soft_max_length)")
            if not 0 < self.soft_cache_length < self.soft_max_length:
                raise ValueError(f"--soft_cache_length {self.soft_cache_length} must be > 0 and "
                                 f"< --soft_max_length {self.soft_max_length}")


# --------------------------------------------------------------------------- built-ins

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\A<think>.*?</think>\s*<answer>.*?</answer>\Z", re.DOTALL)


def _answer_part(text: str) -> tuple[str, bool]:
    m = _ANSWER.search(text)
    return (m.group(1).strip(), True) if m else (text, False)


def _reward_cfg(args: Any) -> RewardConfig:
    """The reward flags out of whatever ``args`` a reward class receives: a RewardConfig, any
    object with (some of) its attributes (the run's flag namespace), or None (the defaults)."""
    if isinstance(args, RewardConfig):
        return args
    if args is None:
        return RewardConfig()
    from dataclasses import fields

    return RewardConfig(**{f.name: getattr(args, f.name) for f in fields(RewardConfig)
                           if f.name not in ("reward_funcs", "external_plugins", "reward_model")
                           and getattr(args, f.name, None) is not None})


def _need(kwargs: Mapping[str, Any], key: str, who: str, what: str) -> Any:
    if kwargs.get(key) is None:
        raise ValueError(f"reward '{who}' needs {what} ('{key}'), which this batch does not have")
    return kwargs[key]


class MathAccuracy(ORM):
    """``accuracy``: math_verify equivalence with the ``solution`` column."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        super().__init__(args)
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("--reward_funcs accuracy needs math_verify: pip install math-verify")

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        from latex2sympy2_extended import NormalizationConfig
        from math_verify import LatexExtractionConfig, parse, verify

        solutions = _need(kwargs, "solution", "accuracy", "a dataset column with the reference "
                          "answer")
        # Untagged completions: only a LaTeX answer (boxed first) counts, not any number in prose.
        untagged = [LatexExtractionConfig(
            normalization_config=NormalizationConfig(nits=False, malformed_operators=False,
                                                     basic_latex=True, boxed="all", units=True),
            boxed_match_priority=0, try_extract_without_anchor=False)]
        out = []
        for text, sol in zip(completions, solutions, strict=True):
            gold = parse(_answer_part(str(sol))[0], extraction_mode="first_match")
            if not gold:
                out.append(0.0)  # an unparseable reference scores nothing either way
                continue
            body, tagged = _answer_part(text)
            pred = (parse(body, extraction_mode="first_match") if tagged
                    else parse(body, extraction_config=untagged, extraction_mode="first_match"))
            try:
                out.append(float(verify(gold, pred)))
            except Exception:  # math_verify raises on expressions it cannot compare: not equal
                out.append(0.0)
        return out


class Format(ORM):
    """``format``: ``<think>...</think>`` then ``<answer>...</answer>``, nothing else."""

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        return [1.0 if _FORMAT.match(c) else 0.0 for c in completions]


def _lengths(kwargs: Mapping[str, Any], who: str) -> list[int]:
    ids = _need(kwargs, "response_token_ids", who, "the completions' token ids")
    return [len(x) for x in ids]


class CosineReward(ORM):
    """``cosine``: accuracy shaped by completion length along half a cosine."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        super().__init__(args)
        self.cfg = _reward_cfg(args)
        self.accuracy = MathAccuracy(self.cfg)

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        c = self.cfg
        acc = self.accuracy(completions, **kwargs)
        out = []
        for a, t in zip(acc, _lengths(kwargs, "cosine"), strict=True):
            at0, atl = ((c.cosine_min_len_value_correct, c.cosine_max_len_value_correct) if a >= 1.0
                        else (c.cosine_min_len_value_wrong, c.cosine_max_len_value_wrong))
            frac = min(t, c.cosine_max_len) / c.cosine_max_len
            out.append(atl + (at0 - atl) * (1.0 + math.cos(math.pi * frac)) / 2.0)
        return out


class RepetitionPenalty(ORM):
    """``repetition``: share of repeated word n-grams times ``--repetition_max_penalty``."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        super().__init__(args)
        self.cfg = _reward_cfg(args)

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        n = self.cfg.repetition_n_grams
        out = []
        for text in completions:
            words = text.lower().split()
            grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
            out.append((1.0 - len(set(grams)) / len(grams)) * self.cfg.repetition_max_penalty
                       if grams else 0.0)
        return out


class SoftOverlong(ORM):
    """``soft_overlong``: DAPO's linear penalty over the last ``--soft_cache_length`` tokens."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        super().__init__(args)
        self.cfg = _reward_cfg(args)
        if self.cfg.soft_cache_length is None:
            raise ValueError("--reward_funcs soft_overlong needs --soft_cache_length")

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        top, ramp = self.cfg.soft_max_length, self.cfg.soft_cache_length
        return [max(-1.0, min(0.0, (top - ramp - t) / ramp))
                for t in _lengths(kwargs, "soft_overlong")]


_BUILTINS: dict[str, type[ORM]] = {
    "accuracy": MathAccuracy, "format": Format, "cosine": CosineReward,
    "repetition": RepetitionPenalty, "soft_overlong": SoftOverlong}
for _n, _c in _BUILTINS.items():
    register(_n, _c)


# --------------------------------------------------------------------------- plugins

_SHIM_MODULES = ("swift", "swift.plugin", "swift.rewards")


class _SwiftShim(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``swift``, ``swift.plugin`` and ``swift.rewards`` (ORM, AsyncORM, orms) while a
    plugin file runs, when ms-swift is not installed. See the module docstring."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname in _SHIM_MODULES:
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        module.__path__ = []
        module.__mvlm_shim__ = True
        if module.__name__ != "swift":
            module.ORM, module.AsyncORM, module.orms = ORM, AsyncORM, orms


@contextmanager
def _swift_import_shim() -> Iterator[bool]:
    """Install the shim for the duration of the block if ms-swift is absent; yields whether it
    was installed."""
    if "swift" in sys.modules or importlib.util.find_spec("swift") is not None:
        yield False
        return
    finder = _SwiftShim()
    sys.meta_path.append(finder)
    try:
        yield True
    finally:
        sys.meta_path.remove(finder)
        for name in _SHIM_MODULES:
            if getattr(sys.modules.get(name), "__mvlm_shim__", False):
                del sys.modules[name]


def load_external_plugins(paths: Sequence[str]) -> list[str]:
    """Execute each ``--external_plugins`` file once; returns the reward names it registered."""
    added: list[str] = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--external_plugins {path}: no such file")
        before = dict(orms)
        real_before: dict[str, Any] = {}
        modname = f"mvlm_plugin_{p.stem}_{abs(hash(str(p.resolve()))):x}"
        with _swift_import_shim() as shimmed:
            if not shimmed:
                real_before = dict(_real_swift_orms() or {})
            spec = importlib.util.spec_from_file_location(modname, p)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module
            try:
                spec.loader.exec_module(module)
            except ModuleNotFoundError as e:
                sys.modules.pop(modname, None)
                hint = ""
                if shimmed and (e.name or "").startswith("swift"):
                    hint = (f" (without ms-swift installed mvlm provides only swift.plugin / "
                            f"swift.rewards with ORM, AsyncORM and orms; {e.name} is not among "
                            "them: install ms-swift or drop that import)")
                raise ImportError(f"--external_plugins {path}: {e}{hint}") from e
            except Exception as e:
                sys.modules.pop(modname, None)
                raise RuntimeError(f"--external_plugins {path}: executing the file failed: "
                                   f"{type(e).__name__}: {e}") from e
            if not shimmed:
                for k, v in (_real_swift_orms() or {}).items():
                    if real_before.get(k) is not v:
                        orms[k] = v
        mine = [k for k, v in orms.items() if before.get(k) is not v]
        for k in mine:
            _ORIGIN[k] = f"{path}: {getattr(orms[k], '__qualname__', type(orms[k]).__name__)}"
        added += mine
        if not mine:
            log.warning("--external_plugins %s registered no reward function (orms[...] = ...)",
                        path)
    return added


def _real_swift_orms() -> dict[str, Any] | None:
    for mod in ("swift.rewards", "swift.plugin"):
        try:
            return importlib.import_module(mod).orms
        except (ImportError, AttributeError):
            continue
    return None


# --------------------------------------------------------------------------- calling

class RewardFunctionError(RuntimeError):
    """A reward function failed or returned something that is not one reward per completion."""


@dataclass
class RewardResult:
    """Rewards of one rollout batch: ``[N, F]`` float32, NaN = not scored."""

    rewards_per_func: torch.Tensor
    names: list[str]
    weights: torch.Tensor
    skipped: dict[str, int]

    def weighted(self) -> torch.Tensor:
        from mvlm.rl.advantages import weighted_rewards

        return weighted_rewards(self.rewards_per_func, self.weights)

    def metrics(self) -> dict[str, float]:
        """``reward`` mean/std and per function ``rewards/<name>/mean|std``, ``.../skipped``."""
        w = self.weighted()
        ok = w[~torch.isnan(w)]
        out = {"reward": float(ok.mean()) if ok.numel() else float("nan"),
               "reward_std": float(ok.std()) if ok.numel() > 1 else 0.0}
        for i, n in enumerate(self.names):
            col = self.rewards_per_func[:, i]
            col = col[~torch.isnan(col)]
            out[f"rewards/{n}/mean"] = float(col.mean()) if col.numel() else float("nan")
            out[f"rewards/{n}/std"] = float(col.std()) if col.numel() > 1 else 0.0
            out[f"rewards/{n}/skipped"] = float(self.skipped.get(n, 0))
        return out


def _instantiate(name: str, obj: Any, args: Any) -> Callable[..., Any]:
    if not isinstance(obj, type):
        if not callable(obj):
            raise TypeError(f"reward '{name}' ({_ORIGIN.get(name, '?')}) is registered as "
                            f"{type(obj).__name__}, not a class or function")
        return obj
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        params = []
    kinds = {p.kind for p in params}
    try:
        if inspect.Parameter.VAR_KEYWORD in kinds or any(p.name == "args" for p in params):
            return obj(args=args)  # ms-swift's call
        if params:
            return obj(args)
        return obj()
    except Exception as e:
        raise RewardFunctionError(f"reward '{name}' ({_ORIGIN.get(name, '?')}): creating it "
                                  f"failed: {type(e).__name__}: {e}") from e


def _accepted_kwargs(func: Callable[..., Any]) -> set[str] | None:
    """Names a function accepts as keywords; ``None`` = anything (``**kwargs``)."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {p.name for p in sig.parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


class RewardSet:
    """The run's reward functions with their weights; call it on a rollout batch."""

    def __init__(self, names: list[str], funcs: list[Callable[..., Any]], weights: list[float],
                 on_reward_error: str = "raise") -> None:
        self.names, self.funcs = names, funcs
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.on_reward_error = on_reward_error
        self._accepts = [_accepted_kwargs(f) for f in funcs]

    def __call__(self, completions: Sequence[str], rows: Sequence[Mapping[str, Any]] | None = None,
                 *, response_token_ids: Sequence[Sequence[int]] | None = None,
                 trainer_state: Any = None,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 prompt_media: Sequence[Mapping[str, Any]] | None = None) -> RewardResult:
        """``rows``: the dataset row of each completion (one per completion, repeated over a
        group); every column reaches the functions as a keyword argument holding a list.
        ``prompt_token_ids`` / ``prompt_media``: each completion's encoded prompt and its media
        (what a ``--reward_model`` scores the completion after); passed when given."""
        n = len(completions)
        rows = list(rows) if rows is not None else [{} for _ in range(n)]
        if len(rows) != n:
            raise ValueError(f"{len(rows)} dataset rows for {n} completions: pass the row of every "
                             "completion (repeat a prompt's row for each of its generations)")
        kwargs: dict[str, Any] = {}
        for r in rows:
            for k in r:
                kwargs.setdefault(k, None)
        for k in ("completions", "response_token_ids", "trainer_state", "prompt_token_ids",
                  "prompt_media"):
            if k in kwargs:
                raise ValueError(f"dataset column '{k}' clashes with the reward-function argument "
                                 f"of that name: rename the column")
        kwargs = {k: [r.get(k) for r in rows] for k in kwargs}
        if response_token_ids is not None:
            if len(response_token_ids) != n:
                raise ValueError(f"{len(response_token_ids)} token-id lists for {n} completions")
            kwargs["response_token_ids"] = [list(x) for x in response_token_ids]
        for key, val in (("prompt_token_ids", prompt_token_ids), ("prompt_media", prompt_media)):
            if val is not None:
                if len(val) != n:
                    raise ValueError(f"{len(val)} {key} entries for {n} completions")
                kwargs[key] = list(val)
        kwargs["trainer_state"] = trainer_state
        out = torch.full((n, len(self.funcs)), float("nan"), dtype=torch.float32)
        skipped: dict[str, int] = {}
        for j, (name, func, acc) in enumerate(zip(self.names, self.funcs, self._accepts,
                                                  strict=True)):
            kw = kwargs if acc is None else {k: v for k, v in kwargs.items() if k in acc}
            col, bad = self._run(name, func, list(completions), kw)
            out[:, j] = col
            if bad:
                skipped[name] = skipped.get(name, 0) + bad
        return RewardResult(out, list(self.names), self.weights.clone(), skipped)

    def _fail(self, name: str, what: str, n: int, cause: BaseException | None = None) -> int:
        msg = (f"reward function '{name}' ({_ORIGIN.get(name, 'passed in')}) {what}; fix the "
               "function, or pass --on_reward_error skip to count and skip such results")
        if self.on_reward_error == "raise":
            raise RewardFunctionError(msg) from cause
        log.warning("%s (skipped)", msg)
        return n

    def _run(self, name: str, func: Callable[..., Any], completions: list[str],
             kw: dict[str, Any]) -> tuple[torch.Tensor, int]:
        n = len(completions)
        nan_col = torch.full((n,), float("nan"))
        try:
            res = func(completions, **kw)
            if inspect.isawaitable(res):
                res = asyncio.run(_await(res))
        except Exception as e:
            return nan_col, self._fail(name, f"raised {type(e).__name__}: {e}", n, e)
        if isinstance(res, torch.Tensor):
            res = res.detach().cpu().reshape(-1).tolist()
        try:
            vals = list(res)
        except TypeError:
            return nan_col, self._fail(name, f"returned {type(res).__name__}, not a list of "
                                       f"{n} rewards", n)
        if len(vals) != n:
            return nan_col, self._fail(name, f"returned {len(vals)} rewards for {n} completions",
                                       n)
        col = nan_col.clone()
        bad = 0
        for i, v in enumerate(vals):
            if v is None:
                continue  # declined: not scored, by design
            try:
                f = float(v)
            except (TypeError, ValueError):
                bad += self._fail(name, f"returned {v!r} ({type(v).__name__}) for completion "
                                  f"{i}, not a number", 1)
                continue
            if not math.isfinite(f):
                bad += self._fail(name, f"returned {f} for completion {i} (return None for "
                                  "'does not apply')", 1)
                continue
            col[i] = f
        return col, bad


async def _await(x: Any) -> Any:
    return await x


def build_rewards(cfg: RewardConfig, args: Any = None,
                  extra: Sequence[tuple[str, Callable[..., Any]]] = ()) -> RewardSet:
    """Load ``--external_plugins``, resolve ``--reward_funcs`` and ``--reward_weights``.

    ``args``: what reward classes receive as ``args`` (the run's flags; default ``cfg``).
    ``extra``: further (name, callable) rewards, weighted after the named functions in the order
    given; the ``--reward_model`` directories come last (ms-swift's order of the weights)."""
    if cfg.external_plugins:
        load_external_plugins(cfg.external_plugins)
    extra = list(extra) + _reward_models(cfg.reward_model, taken=set(cfg.reward_funcs))
    names = list(cfg.reward_funcs) + [n for n, _ in extra]
    if not names:
        raise ValueError("GRPO needs a reward: pass --reward_funcs (built-ins: "
                         f"{', '.join(sorted(_builtin_names()))}) or --reward_model")
    funcs: list[Callable[..., Any]] = []
    for name in cfg.reward_funcs:
        if name not in orms:
            plugin = [k for k in orms if k not in _builtin_names()]
            raise ValueError(f"--reward_funcs {name}: no such reward function. Built-in: "
                             f"{', '.join(sorted(_builtin_names()))}; from plugins: "
                             f"{', '.join(sorted(plugin)) or 'none'}. A plugin registers one with "
                             f"orms['{name}'] = MyORM in a file passed to --external_plugins")
        # built-ins read the reward flags (cfg); plugins get the run's flags, as in ms-swift
        builtin = orms[name] is _BUILTINS.get(name)
        funcs.append(_instantiate(name, orms[name], cfg if builtin or args is None else args))
    funcs += [f for _, f in extra]
    weights = cfg.reward_weights if cfg.reward_weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"--reward_weights has {len(weights)} values for {len(names)} reward "
                         f"functions ({', '.join(names)}): give one weight per function")
    return RewardSet(names, funcs, [float(w) for w in weights], cfg.on_reward_error)


# --------------------------------------------------------------------------- reward models

def check_reward_model_dir(path: str) -> None:
    """Refuse a ``--reward_model`` that is not an ``mvlm rlhf --rlhf_type rm`` export (cheap:
    files only, so a bad path fails while the flags are parsed)."""
    import json

    from mvlm.rl.reward_model import META_FILE

    p = Path(path)
    fix = ("pass the hf/ directory an `mvlm rlhf --rlhf_type rm` run exported (docs/preference.md)")
    if not p.is_dir():
        raise ValueError(f"--reward_model {path}: no such directory; {fix}")
    missing = [f for f in (META_FILE, "config.json") if not (p / f).is_file()]
    if missing:
        raise ValueError(f"--reward_model {path}: not a reward model, {' and '.join(missing)} "
                         f"missing; {fix}")
    try:
        meta = json.loads((p / META_FILE).read_text())
    except ValueError as e:
        raise ValueError(f"--reward_model {path}: {META_FILE} is not JSON ({e}); {fix}") from e
    head = meta.get("head") if isinstance(meta, dict) else None
    if head == "value_head":
        if not (p / str(meta.get("file", ""))).is_file():
            raise ValueError(f"--reward_model {path}: {META_FILE} names the value head file "
                             f"{meta.get('file')!r}, which is missing; {fix}")
    elif head != "sequence_classification":
        raise ValueError(f"--reward_model {path}: {META_FILE} has head {head!r}, not "
                         f"sequence_classification or value_head; {fix}")


class RewardModelReward:
    """A ``--reward_model`` as a reward function: the model's score of each completion's prompt
    token ids followed by its completion token ids (with the prompt's media), i.e. the
    conversation the policy produced. Token ids rather than re-encoded text, so the reward model
    must use the policy's tokenizer (trained from the same base, as ms-swift assumes too); an id
    outside its vocabulary is refused. Runs wherever the rewards are computed (every rank, on its
    own completions), on the current CUDA device when there is one."""

    def __init__(self, name: str, model: Any) -> None:
        self.name, self.model = name, model
        self._placed = False

    def __call__(self, completions: list[str], *, prompt_token_ids: Sequence[Sequence[int]]
                 | None = None, response_token_ids: Sequence[Sequence[int]] | None = None,
                 prompt_media: Sequence[Mapping[str, Any]] | None = None,
                 **kwargs: Any) -> list[float]:
        if prompt_token_ids is None or response_token_ids is None:
            raise ValueError(f"--reward_model {self.model.path} scores prompt + completion token "
                             "ids; this batch has no prompt_token_ids / response_token_ids")
        if not self._placed:
            if torch.cuda.is_available():
                self.model.model.to(torch.device("cuda", torch.cuda.current_device()))
            self._placed = True
        vocab = self.model.model.get_input_embeddings().num_embeddings
        out = []
        for i, (p, c) in enumerate(zip(prompt_token_ids, response_token_ids, strict=True)):
            ids = list(p) + list(c)
            if max(ids) >= vocab:
                raise ValueError(f"--reward_model {self.model.path}: token id {max(ids)} of "
                                 f"completion {i} is outside its vocabulary ({vocab}); the reward "
                                 "model must share the policy's tokenizer")
            media = dict(prompt_media[i]) if prompt_media is not None else {}
            out.append(float(self.model.score_ids(torch.tensor(ids), **media)))
        return out


def _reward_models(dirs: Sequence[str], taken: set[str]) -> list[tuple[str, Any]]:
    """(name, reward function) per ``--reward_model`` directory; the name (in metrics as
    ``rewards/<name>/mean``) is the directory's basename, made unique with ``_2``, ``_3``..."""
    from mvlm.rl.reward_model import load_reward_model

    out: list[tuple[str, Any]] = []
    taken = set(taken)
    for d in dirs:
        check_reward_model_dir(d)
        base = Path(d).resolve().name or "reward_model"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        try:
            rm = load_reward_model(d)
        except Exception as e:
            raise ValueError(f"--reward_model {d}: loading it with transformers failed: "
                             f"{type(e).__name__}: {e}") from e
        _ORIGIN[name] = f"--reward_model {d}"
        out.append((name, RewardModelReward(name, rm)))
    return out


def _builtin_names() -> set[str]:
    return {k for k, v in _ORIGIN.items() if v == "mvlm built-in"}
