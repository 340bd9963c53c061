"""Learner checkpoints on disk: atomic writes, keep-last-K, and a fallback past corrupt files.

A checkpoint is one `torch.save` file, `ckpt-<version, 9 digits>.pt`, holding only tensors and
plain containers (dicts, lists, numbers, strings), so `torch.load(..., weights_only=True)` reads
it without unpickling arbitrary classes. `Learner.save_checkpoint` and `Learner.restore_latest`
decide *what* goes in; this module decides how it reaches the disk and comes back.

A file under a checkpoint name that does not load (truncated by a crash, corrupt, another
format) is renamed `<name>.corrupt` where it is found, whether by a restore or by retention, so
it never counts as one of the `keep` newest and never shadows a good one; it is kept for a
person to look at, never deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a checkpoint is read or written: the driver lists them only
    import torch

log = logging.getLogger(__name__)

#: Bumped when the layout of the saved dict changes incompatibly.
CHECKPOINT_FORMAT = 1
#: Appended to the name of a checkpoint that does not load.
CORRUPT_SUFFIX = ".corrupt"
_NAME_RE = re.compile(r"^ckpt-(\d{9,})\.pt$")


class NoCheckpoint(ValueError):
    """There is nothing to resume from; the message says what the directory holds."""


def checkpoint_path(directory: str, version: int) -> str:
    return os.path.join(directory, f"ckpt-{version:09d}.pt")


def list_checkpoints(directory: str | None) -> list[str]:
    """Paths of the checkpoints in `directory`, oldest (lowest version) first."""
    if directory is None or not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME_RE.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return [path for _, path in sorted(found)]


def write_checkpoint(directory: str, version: int, state: dict[str, Any], keep: int) -> str:
    """Write `state` (plus the format number) as the checkpoint of `version`, atomically, then
    prune to `keep` readable checkpoints (`prune`); returns the path."""
    import torch

    os.makedirs(directory, exist_ok=True)
    path = checkpoint_path(directory, version)
    # Temp file in the same directory (same filesystem), fsync, then an atomic rename: a crash
    # leaves either the old set of files or the complete new one, never half a file under a
    # checkpoint name. Leftover temp files never match the checkpoint name pattern.
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    prune(directory, path, keep)
    return path


def prune(directory: str, newest: str, keep: int) -> None:
    """Keep `newest` (just written) and the `keep - 1` newest other checkpoints that load;
    delete the older ones.

    Each checkpoint that would be kept is loaded first (`keep - 1` loads per write, each
    costing about what the write did): one that does not load is moved aside and the next
    older one takes its place, so a corrupt file never stands in for a good one.
    """
    kept = 1
    for path in reversed(list_checkpoints(directory)):
        if path == newest:
            continue
        if kept >= keep:
            os.unlink(path)
        elif _load(path, "cpu") is not None:
            kept += 1


def readable_checkpoints(
    directory: str | None, map_location: torch.device | str = "cpu"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(path, state)` of each checkpoint that loads, newest first.

    A file that does not load is moved aside (`CORRUPT_SUFFIX`) and skipped, so a caller taking
    the first item falls back to the previous checkpoint.
    """
    for path in reversed(list_checkpoints(directory)):
        state = _load(path, map_location)
        if state is not None:
            yield path, state


def resume_point(directory: str) -> tuple[str, int]:
    """`(path, version)` of the newest checkpoint that loads, for a run that resumes.

    Raises:
      NoCheckpoint: there is none; the message names the directory and what it holds
        (unreadable checkpoints are moved aside first, and listed as such).
    """
    if not os.path.isdir(directory):
        raise NoCheckpoint(f"nothing to resume: no checkpoint directory {directory}")
    for path, state in readable_checkpoints(directory):
        return path, int(state["version"])
    names = sorted(name for name in os.listdir(directory) if not name.startswith("."))
    corrupt = [name for name in names if name.endswith(CORRUPT_SUFFIX)]
    found = "it is empty" if not names else f"it holds {_some(names)}"
    if corrupt:
        found += f"; {len(corrupt)} unreadable checkpoint(s), moved aside as *{CORRUPT_SUFFIX}"
    raise NoCheckpoint(f"nothing to resume: no readable checkpoint in {directory}: {found}")


def _some(names: list[str], most: int = 4) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _load(path: str, map_location: torch.device | str) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when it does not load, and then it is moved aside.

    Whatever stops it loading counts (torch raises `OSError` for a truncated file, for one),
    except a file that is gone or a load that ran out of memory: those say nothing of the file.
    """
    import torch

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a format-{CHECKPOINT_FORMAT} checkpoint")
    except (FileNotFoundError, MemoryError) as exc:
        log.warning("skipping checkpoint %s: %s", path, exc)
        return None
    except Exception as exc:
        log.warning("unreadable checkpoint %s moved aside (%s): %s", path, CORRUPT_SUFFIX, exc)
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.replace(path, path + CORRUPT_SUFFIX)
        return None
    return state


def network_differences(
    spec: dict[str, Any], model_state: dict[str, torch.Tensor], saved: dict[str, Any]
) -> list[str]:
    """What differs between a learner (its spec dict and model state dict) and a saved
    checkpoint's: spec fields, then parameter names and shapes. Empty when compatible."""
    out = []
    theirs = saved.get("spec", {})
    for key in sorted(set(spec) | set(theirs)):
        if spec.get(key) != theirs.get(key):
            out.append(f"{key}: checkpoint {theirs.get(key)!r}, learner {spec.get(key)!r}")
    saved_model = saved.get("model", {})
    for key, tensor in saved_model.items():
        if key not in model_state:
            out.append(f"{key}: only in the checkpoint")
        elif tuple(tensor.shape) != tuple(model_state[key].shape):
            out.append(
                f"{key}: checkpoint shape {tuple(tensor.shape)}, "
                f"learner {tuple(model_state[key].shape)}"
            )
    out += [f"{key}: missing from the checkpoint" for key in model_state if key not in saved_model]
    return out


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
