"""Hub model and dataset IDs (``--model Qwen/Qwen2.5-VL-7B-Instruct``, ``--dataset org/name#N``).

ms-swift scripts name checkpoints and datasets by hub ID, and ms-swift downloads them from
ModelScope unless ``--use_hf true``. mvlm resolves an ID to a local directory in this order:

1. a local path that exists is used as it is (a local directory always wins over an ID);
2. the Hugging Face cache (``HF_HUB_CACHE``, or ``HF_HOME/hub``), without any network access: a
   checkpoint fetched once by ``huggingface-cli download`` / ``snapshot_download`` is reused,
   also when ``HF_HUB_OFFLINE=1`` (then this is the only hub source tried);
3. ``--use_hf true``: a Hugging Face download (``huggingface_hub.snapshot_download``);
4. ``--use_hf false`` (ms-swift's default, ModelScope): ModelScope's ``snapshot_download`` when
   the ``modelscope`` package is installed, otherwise a Hugging Face download of the same ID
   (the Qwen/OpenGVLab/... IDs in ms-swift's examples exist on both hubs), and if that fails an
   error that says how to get the files (``pip install modelscope``, or download them and pass
   the local path).

Why the HF cache comes first even with ``--use_hf false``: it is local, costs nothing and holds
exactly the files a user already downloaded; going to ModelScope for an ID that is on disk would
download tens of GB twice. Every resolution is reported with one info line naming the source.

Imports of ``huggingface_hub`` / ``modelscope`` are deferred to the call: the CLI's help screens
import this module's callers and must stay light.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger("mvlm.hub")

# org/name with HF's allowed characters; no leading '.', '/', '~' (those are paths).
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*")


class HubResolutionError(FileNotFoundError):
    """An ID that is neither a local path nor obtainable from a hub (message says the fix)."""


@dataclass
class Resolved:
    """Where an ID ended up, and from which source (for the info line)."""

    path: str
    source: str  # "local" | "hf-cache" | "hf" | "modelscope"


def is_repo_id(text: str) -> bool:
    """``org/name`` that does not exist as a local path."""
    return bool(_REPO_ID.fullmatch(text)) and not os.path.exists(text)


def _truthy(v: str | None) -> bool:
    return str(v or "").strip().lower() in ("1", "true", "yes", "on")


def hf_offline() -> bool:
    """HF_HUB_OFFLINE (read now, not at import, so tests and wrappers can set it late)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def hf_cache_dir() -> str:
    """The HF hub cache, from the environment at call time (HF_HUB_CACHE > HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def _hf(repo_id: str, repo_type: str, *, local_only: bool, revision: str | None,
        token: str | None) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, repo_type=repo_type, revision=revision, token=token,
                             cache_dir=hf_cache_dir(), local_files_only=local_only)


def _modelscope(repo_id: str, repo_type: str, revision: str | None, token: str | None) -> str:
    """ModelScope's own downloaders (modelscope 1.x: both take revision and token)."""
    kw = {"revision": revision, **({"token": token} if token else {})}
    if repo_type == "dataset":
        from modelscope.hub.snapshot_download import dataset_snapshot_download

        return dataset_snapshot_download(repo_id, **kw)
    from modelscope.hub.snapshot_download import snapshot_download

    return snapshot_download(repo_id, **kw)


def resolve(repo_or_path: str, *, repo_type: str = "model", use_hf: bool | None = None,
            revision: str | None = None, token: str | None = None, flag: str = "--model"
            ) -> Resolved:
    """A local path, or a hub ID turned into a local snapshot directory (see module doc)."""
    if os.path.exists(repo_or_path) or not _REPO_ID.fullmatch(repo_or_path):
        return Resolved(repo_or_path, "local")
    what = "dataset" if repo_type == "dataset" else "model"
    try:
        return Resolved(_hf(repo_or_path, repo_type, local_only=True, revision=revision,
                            token=token), "hf-cache")
    except Exception as e:  # noqa: BLE001 - any cache miss falls through to the downloads
        cache_miss = f"{type(e).__name__}"
    if hf_offline():
        kind = "--repo-type dataset " if what == "dataset" else ""
        raise HubResolutionError(
            f"{flag} {repo_or_path}: not a local path, and the {what} is not in the Hugging "
            f"Face cache {hf_cache_dir()} ({cache_miss}) while HF_HUB_OFFLINE=1: download it "
            f"on a machine with access (huggingface-cli download {kind}{repo_or_path}) into "
            "that cache, or pass a local path")
    errors: list[str] = []
    if not use_hf:
        try:
            return Resolved(_modelscope(repo_or_path, repo_type, revision, token), "modelscope")
        except ImportError:
            errors.append("modelscope is not installed (pip install modelscope)")
        except Exception as e:  # noqa: BLE001
            errors.append(f"ModelScope: {type(e).__name__}: {e}")
    try:
        return Resolved(_hf(repo_or_path, repo_type, local_only=False, revision=revision,
                            token=token), "hf")
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else ""
        errors.append(f"Hugging Face: {type(e).__name__}: {first}")
    hint = ("pip install modelscope (ms-swift's default hub; --use_hf false)" if not use_hf
            else "check the ID and your network/HF_TOKEN")
    raise HubResolutionError(
        f"{flag} {repo_or_path}: not a local path and could not be fetched ("
        + "; ".join(errors) + f"). Fix: {hint}, or download the {what} and pass its local path")


def resolve_model(model: str, *, use_hf: bool | None = None, revision: str | None = None,
                  token: str | None = None, flag: str = "--model") -> str:
    """``--model``: local dir as is, or the snapshot dir of a hub ID (one info line)."""
    r = resolve(model, repo_type="model", use_hf=use_hf, revision=revision, token=token,
                flag=flag)
    if r.source != "local":
        log.info("%s %s -> %s (%s)", flag, model, r.path, r.source)
    return r.path


_DATA_FILES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")


def _in_subset(rel: str, subset: str) -> bool:
    """``validation/x.jsonl``, ``validation.jsonl``, ``data/validation-00000-of-1.parquet``."""
    parts = rel.replace("\\", "/").split("/")
    name = parts[-1]
    return subset in parts[:-1] or name.split(".")[0] == subset or \
        re.match(re.escape(subset) + r"[-_.]", name) is not None


def dataset_files(root: str, subset: str | None, label: str | None = None) -> list[str]:
    """In a downloaded dataset repo, the data files (jsonl/json/parquet/csv/arrow) that hold
    the rows; with a subset, those whose path has it as a directory or name part
    (``validation/x.jsonl``, ``data/validation-00000.parquet``)."""
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        files += [os.path.join(d, n) for n in sorted(names)
                  if n.lower().endswith(_DATA_FILES) and not n.startswith(".")]
    if subset:
        files = [f for f in files if _in_subset(os.path.relpath(f, root), subset)]
    if not files:
        raise HubResolutionError(
            f"--dataset {label or root}{':' + subset if subset else ''}: no data file "
            f"({', '.join(_DATA_FILES)}){' for subset ' + repr(subset) if subset else ''} in "
            f"the downloaded dataset {root}")
    return files
