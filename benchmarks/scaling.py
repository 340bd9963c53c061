"""End-to-end env steps/s of `offpg train` with 1, 2, 4, 8 rollout actors on this machine.

Each point is a full training job on a fresh embedded Ray (CartPole-v1 by default, the default
recipe, `run.target_return=none`) run to a fixed env-step budget; the rate is the job's
steps per second between its first and its last progress point (Ray start-up, actor
construction and the final checkpoint excluded, so the number is the steady state). Printed as
a Markdown table and plotted to a PNG.

    python benchmarks/scaling.py --actors 1 2 4 8 --steps 300000 --out benchmarks/scaling.png

Actors ask for `run.actor_cpus` logical CPUs each (default 0.5 here, so 8 actors fit a
small machine's embedded Ray); on a machine with fewer cores than actors the actors share the
cores, and the curve shows where adding actors stops paying.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder is sys.path[0], and benchmarks/replay.py would shadow the
# `replay` package the job imports.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from deploy import metrics as tags  # noqa: E402
from deploy.config import load_config  # noqa: E402
from deploy.job import train  # noqa: E402


@dataclasses.dataclass
class Point:
    actors: int
    env_steps: int
    wall_s: float
    steady_steps_per_s: float
    learner_version: int


def measure(actors: int, steps: int, overrides: list[str], logdir: str) -> Point:
    config = load_config(
        None,
        [
            f"run.num_actors={actors}",
            f"run.max_env_steps={steps}",
            "run.target_return=none",
            "run.log_every=1.0",
            *overrides,
        ],
        extra={"run.logdir": logdir, "run.name": f"scaling-{actors}"},
    )
    summary = train(config)
    events = EventAccumulator(summary.run_dir, size_guidance={"scalars": 0})
    events.Reload()
    # Env steps (the x-axis) at each progress point, and the wall time of each point.
    points = [(e.wall_time, e.step) for e in events.Scalars(tags.ENV_STEPS_PER_S)]
    points = [p for p in points if p[1] > 0]
    if len(points) >= 2:
        (t0, s0), (t1, s1) = points[0], points[-1]
        steady = (s1 - s0) / max(t1 - t0, 1e-9)
    else:
        steady = summary.env_steps / summary.wall_s
    return Point(actors, summary.env_steps, summary.wall_s, steady, summary.learner_version)


def table(points: list[Point], cores: int) -> str:
    base = points[0].steady_steps_per_s
    rows = [
        f"| actors | env steps/s | speed-up vs {points[0].actors} | env steps | wall s | "
        "learner steps |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in points:
        rows.append(
            f"| {p.actors} | {p.steady_steps_per_s:,.0f} | {p.steady_steps_per_s / base:.2f}x | "
            f"{p.env_steps:,} | {p.wall_s:.1f} | {p.learner_version:,} |"
        )
    rows.append(f"\n({cores} cores; steady-state rate between the first and last progress point)")
    return "\n".join(rows)


def plot(points: list[Point], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    xs = [p.actors for p in points]
    ys = [p.steady_steps_per_s for p in points]
    ax.plot(xs, ys, "o-", label="offpg train, end to end")
    ax.plot(xs, [ys[0] * x / xs[0] for x in xs], "--", color="grey", label="linear")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("rollout actors")
    ax.set_ylabel("env steps / s")
    ax.set_ylim(bottom=0, top=max(ys) * 1.6)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=300_000, help="env-step budget per point")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=["run.actor_cpus=0.5"],
        metavar="KEY=VALUE",
        help="config override for every point (repeatable)",
    )
    parser.add_argument("--out", default="benchmarks/scaling.png", help="PNG to write")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    points = []
    with tempfile.TemporaryDirectory(prefix="offpg-scaling-") as logdir:
        for n in args.actors:
            started = time.monotonic()
            points.append(measure(n, args.steps, args.overrides, logdir))
            print(f"# {n} actor(s): {time.monotonic() - started:.1f} s", flush=True)
    print(table(points, cores))
    plot(points, args.out, f"CartPole-v1, {cores} cores, {args.steps:,} env steps per point")
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
