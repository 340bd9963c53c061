"""Learning curves from TensorBoard event files: `offpg plot RUN_DIR... [--tag] [--out]`.

Each curve is one group of runs, treated as seeds of the same experiment:

- `offpg plot runs/a-s0 runs/a-s1 runs/a-s2` draws ONE curve (the three runs are seeds);
- `offpg plot 'vtrace=runs/vt-*' 'none=runs/rtg-*'` draws one curve per `LABEL=GLOB` argument,
  each over the runs its glob matches (quote the glob so the shell leaves it alone).

A run is any directory holding `events.out.tfevents.*` files; a directory given on the command
line is searched for them recursively, so a parent of several runs expands to all of them (as
seeds of one curve). Per run the scalar `tag` is read (non-finite points dropped: the mean
return is NaN until the first episodes end) and smoothed with TensorBoard's debiased
exponential moving average; the runs of a group are then interpolated onto a common
environment-step grid over the range they all cover. The line is the mean across seeds, the
band spans the lowest to the highest seed (with three seeds a standard deviation says little).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_TAG = "episode/return_mean"
#: Points of the common step grid each group is interpolated onto.
GRID_POINTS = 200


@dataclasses.dataclass(frozen=True)
class Series:
    """One run's scalar: `steps [K]` (int64, increasing) and `values [K]` (float64)."""

    steps: np.ndarray
    values: np.ndarray


@dataclasses.dataclass(frozen=True)
class Curve:
    """A group of seeds on a common grid: `x [P]`, and `mean`, `low`, `high` `[P]`."""

    label: str
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    seeds: int


def find_runs(path: str | os.PathLike[str]) -> list[Path]:
    """Directories under `path` (itself included) that hold TensorBoard event files, sorted."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    runs = {p.parent for p in root.rglob("events.out.tfevents.*") if p.is_file()}
    return sorted(runs)


def read_scalar(run_dir: str | os.PathLike[str], tag: str = DEFAULT_TAG) -> Series:
    """The scalar `tag` of one run directory (its own event files, not subdirectories').

    Points are sorted by step; of several points at one step (a resumed run) the last wins;
    non-finite values are dropped. Raises `KeyError` naming the tags the run does have.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    available = events.Tags().get("scalars", [])
    if tag not in available:
        raise KeyError(f"{run_dir} has no scalar {tag!r} (it has: {', '.join(sorted(available))})")
    by_step: dict[int, float] = {}
    for event in events.Scalars(tag):
        by_step[int(event.step)] = float(event.value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    values = np.array([by_step[s] for s in steps], dtype=np.float64)
    keep = np.isfinite(values)
    return Series(steps[keep], values[keep])


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: a debiased exponential moving average, `weight` in [0, 1).

    Debiasing divides by `1 - weight**(i + 1)`, so the first points are not pulled towards 0.
    `weight = 0` returns the values unchanged.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must lie in [0, 1), got {weight}")
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    acc = 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1.0 - weight) * v
        out[i] = acc / (1.0 - weight ** (i + 1))
    return out


def aggregate(
    label: str, runs: Sequence[Series], *, weight: float = 0.6, points: int = GRID_POINTS
) -> Curve:
    """Smooth each run, interpolate onto a grid over the steps all runs cover, reduce.

    Raises `ValueError` when a run has no points or the runs share no step range.
    """
    if not runs:
        raise ValueError(f"{label}: no runs")
    for i, run in enumerate(runs):
        if run.steps.size == 0:
            raise ValueError(f"{label}: run {i} has no finite points")
    start = max(float(r.steps[0]) for r in runs)
    stop = min(float(r.steps[-1]) for r in runs)
    if stop < start:
        raise ValueError(f"{label}: the runs cover no common range of steps")
    x = np.linspace(start, stop, points) if stop > start else np.array([start])
    ys = np.stack([np.interp(x, r.steps, smooth(r.values, weight)) for r in runs])
    return Curve(label, x, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0), len(runs))


def parse_groups(args: Sequence[str]) -> list[tuple[str, list[Path]]]:
    """Command-line arguments -> `(label, run directories)` per curve; see the module docstring.

    Plain paths (no `=`) form one group, labelled by their common name prefix; every
    `LABEL=GLOB` is a group of its own. Raises `ValueError` when an argument matches no run.
    """
    plain: list[Path] = []
    groups: list[tuple[str, list[Path]]] = []
    for arg in args:
        label, sep, pattern = arg.partition("=")
        if sep and label and not os.path.exists(arg):
            matches = sorted(glob.glob(pattern))
            runs = [run for m in matches if os.path.isdir(m) for run in find_runs(m)]
            if not runs:
                raise ValueError(f"{arg}: the glob {pattern!r} matches no run directory")
            groups.append((label, runs))
        else:
            runs = find_runs(arg)
            if not runs:
                raise ValueError(f"{arg}: no TensorBoard event files under it")
            plain.extend(runs)
    if plain:
        names = [p.name for p in plain]
        # A character prefix on purpose: runs "cartpole-s0", "cartpole-s1" -> "cartpole".
        label = os.path.commonprefix(names).rstrip("-_ .") or names[0]  # noqa: RUF071
        groups.insert(0, (label, plain))
    return groups


def plot_curves(
    curves: Sequence[Curve],
    out: str | os.PathLike[str],
    *,
    tag: str = DEFAULT_TAG,
    title: str | None = None,
    ax: object | None = None,
) -> None:
    """Draw the curves (line = mean, band = min..max over seeds) and save a PNG to `out`.

    With `ax` (a matplotlib Axes) the curves are drawn there and nothing is saved.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(7, 4.2))
    for curve in curves:
        (line,) = ax.plot(curve.x, curve.mean, label=f"{curve.label} ({curve.seeds} seeds)")
        if curve.seeds > 1:
            ax.fill_between(curve.x, curve.low, curve.high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(tag)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if own:
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)


def plot_runs(
    args: Sequence[str],
    out: str | os.PathLike[str],
    *,
    tag: str = DEFAULT_TAG,
    weight: float = 0.6,
) -> list[Curve]:
    """What `offpg plot` does: groups from `args`, read, aggregate, draw to `out`."""
    curves = []
    for label, runs in parse_groups(args):
        series = [read_scalar(run, tag) for run in runs]
        curves.append(aggregate(label, series, weight=weight))
    plot_curves(curves, out, tag=tag)
    return curves


def describe(curve: Curve) -> str:
    """One line per curve for the terminal: final mean and band, step range."""
    last = curve.mean[-1]
    spread = "" if curve.seeds == 1 else f" [{curve.low[-1]:.4g}, {curve.high[-1]:.4g}]"
    end = curve.x[-1]
    return (
        f"{curve.label}: {curve.seeds} run(s), final {last:.4g}{spread} at "
        f"{int(end):,} steps" + ("" if math.isfinite(last) else " (no data)")
    )
