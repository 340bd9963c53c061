"""Stacked image observations, each frame stored once per fragment.

An Atari observation is the last K frames (K = `frame_stack`, newest last): `[K, H, W]`. Row
t + 1 of a fragment's observations is row t shifted by one frame, so `[T+1, N, K, H, W]`
repeats every frame K times. `pack` keeps each frame once, `[T+K, N, H, W]`: rows 0..K-1 are
row 0's stack, row K-1+t is row t's newest frame, and row t's stack is `frames[t : t+K]`.

Where a stack does not continue the row before it, the shift rule does not hold: after an
episode reset the env fills the older K-1 places of the stack with padding (zeros in ale-py's
vector env, copies of the first frame in Gymnasium's `FrameStackObservation`), so a stack never
mixes frames of two episodes. `pack` finds every such (t, n) by comparison (it needs no
knowledge of the env or its padding), lists it in `resets [R, 2]` (int32 (t, n), sorted) and
keeps its older K-1 frames in `heads [R, K-1, H, W]`. `unpack` rebuilds the stacks exactly:
each reset row gets its heads, and the K-2 rows after it, which still hold some of them, get
what is left of them (a later reset of the same column overwrites an earlier one).

The stacks the actor acted on and the ones the learner rebuilds are therefore the same arrays
(tests/test_frames.py checks it across resets inside a fragment, on ale-py and on Gymnasium).
An observation that is not a frame stack at all packs to the same size as unpacked (every row
is a reset) and still unpacks exactly. `learner.prefetch` does the same rebuild in torch, on
the learner's device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Packed(NamedTuple):
    frames: np.ndarray  # [T+K, N, *frame_shape]
    resets: np.ndarray  # [R, 2] int32: (t, n) whose stack does not continue row t-1's
    heads: np.ndarray  # [R, K-1, *frame_shape]: the older K-1 frames of those stacks


def pack(obs: np.ndarray) -> Packed:
    """`obs [T+1, N, K, *frame_shape]` (K >= 2) -> each frame once; see the module doc."""
    if obs.ndim < 3 or obs.shape[2] < 2:
        raise ValueError(f"pack needs [T+1, N, K >= 2, ...] observations, got {obs.shape}")
    t1, n, k = obs.shape[:3]
    frames = np.empty((t1 - 1 + k, n, *obs.shape[3:]), obs.dtype)
    frames[:k] = np.moveaxis(obs[0], 1, 0)
    frames[k:] = obs[1:, :, -1]
    # Row t continues row t-1 when its older K-1 frames are row t-1's newer K-1.
    same = obs[1:, :, :-1] == obs[:-1, :, 1:]
    broken = ~same.reshape(t1 - 1, n, -1).all(axis=2)
    t_idx, n_idx = np.nonzero(broken)
    resets = np.stack([t_idx + 1, n_idx], axis=1).astype(np.int32)
    heads = obs[t_idx + 1, n_idx, :-1]
    return Packed(frames, resets.reshape(-1, 2), heads)


def fragment_obs(obs: np.ndarray, frame_stack: int) -> dict[str, object]:
    """The observation fields of a `Fragment` for `obs [T+1, N, *obs_shape]`: packed when
    `frame_stack` > 1 (`obs_shape[0]` is then the stack), else `obs` as it is."""
    if frame_stack == 1:
        return {"obs": obs}
    frames, resets, heads = pack(obs)
    return {"obs": frames, "frame_stack": frame_stack, "stack_resets": resets, "stack_heads": heads}


def unpack(frames: np.ndarray, frame_stack: int, resets: np.ndarray, heads: np.ndarray):
    """The stacks `[T+1, N, K, *frame_shape]` that `pack` was given (a new array)."""
    k = frame_stack
    windows = np.lib.stride_tricks.sliding_window_view(frames, k, axis=0)  # [T+1, N, ..., K]
    obs = np.ascontiguousarray(np.moveaxis(windows, -1, 2))
    rows, cols, places, sources = head_positions(resets, k, obs.shape[0])
    obs[rows, cols, places] = heads[sources, places + (rows - resets[sources, 0])]
    return obs


def head_positions(
    resets: np.ndarray, frame_stack: int, num_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each reset's heads go: `obs[rows, cols, places] = heads[sources, places + j]`,
    j = rows - the reset's row. Every (row, col, place) appears once: a later reset of a column
    replaces the earlier one's heads wherever both would write (its span covers all of them).
    """
    k = frame_stack
    resets = np.asarray(resets, np.int64).reshape(-1, 2)
    entries = []  # (row, col, place, source) for every place a reset's heads reach
    for j in range(k - 1):  # the reset row itself (j = 0) and the k - 2 rows after it
        for place in range(k - 1 - j):
            rows = resets[:, 0] + j
            keep = rows < num_rows
            source = np.flatnonzero(keep)
            entries.append(
                np.stack([rows[keep], resets[keep, 1], np.full(len(source), place), source], 1)
            )
    if not entries or not sum(len(e) for e in entries):
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty
    table = np.concatenate(entries)
    # Sorted by (row, col, place, source): the last entry of each position is the latest reset.
    table = table[np.lexsort((table[:, 3], table[:, 2], table[:, 1], table[:, 0]))]
    last = np.ones(len(table), bool)
    last[:-1] = np.any(table[1:, :3] != table[:-1, :3], axis=1)
    table = table[last]
    return table[:, 0], table[:, 1], table[:, 2], table[:, 3]


def check(
    obs: np.ndarray,
    k: int,
    t: int,
    n: int,
    resets: object,
    heads: object,
    describe: Callable[[object], str],
) -> tuple[str, str] | None:
    """What is wrong with a fragment's stack fields, as (message, reason), or None (for
    `trajectory.validate`, which has checked `obs` against T + K rows and N columns):

    `resets` int32 `[R, 2]` of distinct (t, n) in 1..T x 0..N-1, in (t, n) order, none when
    K = 1; `heads` `[R, K-1, *frame_shape]` of `obs`'s dtype (when K = 1: any empty array);
    frames of rank >= 1.
    """
    if k > 1 and obs.ndim < 3:
        return (
            f"obs has shape {obs.shape}: with frame_stack {k} it must be [T+K, N, *frame_shape]",
            "shape",
        )
    if not isinstance(resets, np.ndarray) or resets.dtype != np.int32 or resets.ndim != 2:
        return f"stack_resets must be int32 [R, 2], got {describe(resets)}", "invalid"
    r = resets.shape[0]
    if resets.shape[1] != 2 or (k == 1 and r):
        return (
            f"stack_resets has shape {resets.shape}: must be [R, 2], and R = 0 when "
            "frame_stack is 1",
            "shape",
        )
    t_col, n_col = resets[:, 0].astype(np.int64), resets[:, 1].astype(np.int64)
    if r and not (
        (t_col >= 1).all()
        and (t_col <= t).all()
        and (n_col >= 0).all()
        and (n_col < n).all()
        and (np.diff(t_col * n + n_col) > 0).all()
    ):
        return (
            f"stack_resets must be distinct (t, n) with 1 <= t <= T={t}, 0 <= n < N={n}, in "
            "(t, n) order",
            "invalid",
        )
    if k == 1 and isinstance(heads, np.ndarray) and heads.shape[:1] == (0,):
        return None  # nothing to rebuild: any empty array (its shape follows obs's when made)
    expected = (r, k - 1, *obs.shape[2:])
    if not isinstance(heads, np.ndarray) or heads.dtype != obs.dtype or heads.shape != expected:
        return (
            f"stack_heads must be {obs.dtype.name} of shape {expected} (R, frame_stack - 1, "
            f"*frame_shape), got {describe(heads)}",
            "shape",
        )
    return None
