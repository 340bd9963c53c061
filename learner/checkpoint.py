"""Learner checkpoints on disk: atomic writes, keep-last-K, and a fallback past corrupt files.

A checkpoint is one `torch.save` file, `ckpt-<version, 9 digits>.pt`, holding only tensors and
plain containers (dicts, lists, numbers, strings), so `torch.load(..., weights_only=True)` reads
it without unpickling arbitrary classes. `Learner.save_checkpoint` and `Learner.restore_latest`
decide *what* goes in; this module decides how it reaches the disk and comes back.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Bumped when the layout of the saved dict changes incompatibly.
CHECKPOINT_FORMAT = 1
_NAME_RE = re.compile(r"^ckpt-(\d{9,})\.pt$")


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
    delete all but the newest `keep`; returns the path."""
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
    for old in list_checkpoints(directory)[:-keep]:
        os.unlink(old)
    return path


def readable_checkpoints(
    directory: str | None, map_location: torch.device | str = "cpu"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(path, state)` of each checkpoint that loads, newest first.

    A file that cannot be read (truncated by a crash, corrupt, another format) is logged and
    skipped, so a caller taking the first item falls back to the previous checkpoint.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
            if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not a format-{CHECKPOINT_FORMAT} checkpoint")
        except Exception as exc:  # any unreadable file falls back to the one before
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        yield path, state


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
