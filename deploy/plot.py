"""Learning curves from TensorBoard event files: `offpg plot RUN_DIR... [--tag] [--out]`.

Each curve is one group of runs, treated as seeds of the same experiment:

- `offpg plot runs/a-s0 runs/a-s1 runs/a-s2` draws ONE curve (the three runs are seeds);
- `offpg plot 'vtrace=runs/vt-*' 'none=runs/rtg-*'` draws one curve per `LABEL=GLOB` argument,
  each over the runs its glob matches (quote the glob so the shell leaves it alone);
- `offpg plot --each runs/<tune-name>` draws one curve per run found (the trials of
  `offpg tune`), labelled by its directory name.

A run is any directory holding `events.out.tfevents.*` files; a directory given on the command
line is searched for them recursively, so a parent of several runs expands to all of them (as
seeds of one curve). Per run the scalar `tag` is read (non-finite points dropped: the mean
return is NaN until the first episodes end), smoothed only when asked (`--smooth`, TensorBoard's
debiased exponential moving average; by default the curve is what was logged), and the runs of a
group are interpolated onto a common environment-step grid over the range they all cover. The
line is the mean across seeds, the band spans the lowest to the highest seed (with three seeds a
standard deviation says little). A curve of the mean return gets a dashed line at the target
return of its runs (`run.target_return` in each run's `config.toml`).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_TAG = "episode/return_mean"
#: Points of the common step grid each group is interpolated onto.
GRID_POINTS = 200
#: The time `deploy.job.run_name` appends to a run named after its env.
_RUN_TIME = re.compile(r"-\d{8}-\d{6}$")


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
    target: float | None = None  # the runs' target return, when they share one


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


def run_target(run_dir: str | os.PathLike[str]) -> float | None:
    """`run.target_return` from the run's `config.toml`; None when it has none (or no file)."""
    path = Path(run_dir) / "config.toml"
    try:
        value = tomllib.loads(path.read_text()).get("run", {}).get("target_return")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def aggregate(
    label: str,
    runs: Sequence[Series],
    *,
    weight: float = 0.0,
    points: int = GRID_POINTS,
    target: float | None = None,
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
    return Curve(label, x, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0), len(runs), target)


def parse_groups(args: Sequence[str]) -> list[tuple[str, list[Path]]]:
    """Command-line arguments -> `(label, run directories)` per curve; see the module docstring.

    Plain paths (no `=`) form one group, labelled from their run names (`label_for`); every
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
        groups.insert(0, (label_for([p.name for p in plain]), plain))
    return groups


def label_for(names: Sequence[str]) -> str:
    """A curve's label from its runs' names: one run's name as it is; for several, the words
    they share from the start (split at - _ .), leaving out the time `offpg train` appends to
    an unnamed run ("CartPole-v1-20260101-120000"), else the names themselves."""
    if len(names) == 1:
        return names[0]
    words = [re.split(r"([-_.])", _RUN_TIME.sub("", name)) for name in names]
    shared: list[str] = []
    for parts in zip(*words, strict=False):
        if len(set(parts)) > 1:
            break
        shared.append(parts[0])
    label = "".join(shared).rstrip("-_.")
    if label:
        return label
    return " + ".join(names) if len(names) <= 3 else f"{names[0]} + {len(names) - 1} more"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


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
        label = f"{curve.label} ({_plural(curve.seeds, 'seed')})"
        (line,) = ax.plot(curve.x, curve.mean, label=label)
        if curve.seeds > 1:
            ax.fill_between(curve.x, curve.low, curve.high, color=line.get_color(), alpha=0.2)
    for target in sorted({c.target for c in curves if c.target is not None}):
        ax.axhline(target, color="0.3", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean return (last 100 episodes)" if tag == DEFAULT_TAG else tag)
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
    weight: float = 0.0,
    each: bool = False,
) -> list[Curve]:
    """What `offpg plot` does: groups from `args` (with `each`, every run its own group), read,
    aggregate, draw to `out`. A curve of the mean return carries its runs' target when they
    share one."""
    curves = []
    groups = parse_groups(args)
    if each:
        groups = [(run.name, [run]) for _, runs in groups for run in runs]
    for label, runs in groups:
        series = [read_scalar(run, tag) for run in runs]
        targets = {run_target(run) for run in runs}
        target = targets.pop() if tag == DEFAULT_TAG and len(targets) == 1 else None
        curves.append(aggregate(label, series, weight=weight, target=target))
    plot_curves(curves, out, tag=tag)
    return curves


def describe(curve: Curve) -> str:
    """One line per curve for the terminal: final mean and band, step range."""
    last = curve.mean[-1]
    spread = "" if curve.seeds == 1 else f" [{curve.low[-1]:.4g}, {curve.high[-1]:.4g}]"
    end = curve.x[-1]
    target = f", target {curve.target:g}" if curve.target is not None else ""
    return (
        f"{curve.label}: {_plural(curve.seeds, 'run')}, final {last:.4g}{spread} at "
        f"{int(end):,} steps{target}" + ("" if math.isfinite(last) else " (no data)")
    )
