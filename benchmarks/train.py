"""End-to-end training speed on this machine: time to solve CartPole-v1, throughput, raw stepping.

Three measurements, in one run so they share the machine's conditions:

1. time to solve: `offpg train` with the default config (CartPole-v1 to a mean return of 475
   over 100 episodes) as a fresh subprocess per seed, wall time measured outside it, so Python
   start-up, imports and the embedded Ray's start are included; median over seeds;
2. throughput: a fixed env-step budget with no target, the rate the driver measured
   (`env_steps / wall`), for 1 and 2 actors on the same machine;
3. raw stepping: the same vectorised CartPole env (64 envs, the default) stepped with random
   actions on one core, no policy, no Ray: the ceiling an actor can approach.

    python benchmarks/train.py                 # 3 seeds
    python benchmarks/train.py --seeds 1 --throughput-steps 2000000
    python benchmarks/train.py --config deploy/configs/pendulum.toml --throughput-steps 0

`--config FILE` times another recipe to its own target (Pendulum-v1 to -250: the learning test
behind it is marked `long`, out of the default suite); `--throughput-steps 0` skips part 2.

Targets (issue 4): solved in under 30 s wall, at least 100k env steps/s end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.rollout import raw_steps_per_s  # noqa: E402


def run_offpg(
    logdir: str, name: str, overrides: list[str], timeout: float, config: str | None = None
) -> dict:
    """One `offpg train` subprocess; returns its summary.json plus the outside wall time."""
    cmd = [sys.executable, "-m", "deploy.cli", "train", "--logdir", logdir, "--name", name]
    if config:
        cmd += ["--config", config]
    for override in overrides:
        cmd += ["--set", override]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    wall = time.perf_counter() - start
    summary_path = Path(logdir) / name / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"offpg train {name} failed ({proc.returncode}):\n{tail}")
    summary = json.loads(summary_path.read_text())
    summary["outside_wall_s"] = wall
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--throughput-steps", type=int, default=3_000_000)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--config", default=None, help="recipe to time (default: CartPole-v1's)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}", flush=True)

    raw = raw_steps_per_s("CartPole-v1", 64, seconds=3.0)
    print(f"raw CartPole vector env (64 envs, random actions, one core): {raw:,.0f} steps/s")

    solves = []
    with tempfile.TemporaryDirectory() as logdir:
        for seed in range(args.seeds):
            s = run_offpg(logdir, f"solve-{seed}", [f"env.seed={seed}"], args.timeout, args.config)
            solves.append(s)
            status = (
                f"solved at {s['solved_at_env_steps']:,} steps" if s["solved"] else "NOT solved"
            )
            print(
                f"seed {seed}: {status}, wall {s['outside_wall_s']:.1f} s outside "
                f"({s['wall_s']:.1f} s in the driver)",
                flush=True,
            )
        throughput = {}
        for actors in (1, 2) if args.throughput_steps else ():
            s = run_offpg(
                logdir,
                f"throughput-{actors}",
                [
                    "run.target_return=none",
                    f"run.max_env_steps={args.throughput_steps}",
                    f"run.num_actors={actors}",
                    'replay.sampler="fifo"',
                    "replay.max_times_sampled=1",
                    "replay.samples_per_insert=none",
                    "replay.tolerance=0",
                    "replay.capacity_fragments=256",
                    "actors.num_envs=256",
                    "actors.unroll_length=32",
                    f"run.actor_cpus={1.0 / actors}",
                ],
                args.timeout,
            )
            throughput[actors] = s["env_steps"] / s["wall_s"]
            print(f"throughput, {actors} actor(s): {throughput[actors]:,.0f} env steps/s")

    solved = [s for s in solves if s["solved"]]
    wall = statistics.median(s["outside_wall_s"] for s in solves)
    steps = statistics.median(s["solved_at_env_steps"] for s in solved) if solved else None
    what = f"{args.config or 'CartPole-v1'} to its target"
    print()
    print("| measurement | value | target |")
    print("| --- | ---: | --- |")
    print(
        f"| {what}: wall time, median of {len(solves)} (Ray start-up included) | {wall:.1f} s | "
        + ("" if args.config else f"< 30 s: {'met' if wall < 30 else 'MISSED'}")
        + " |"
    )
    print(f"| {what}: env steps, median | {'-' if steps is None else f'{steps:,.0f}'} | |")
    print(f"| solved | {len(solved)}/{len(solves)} seeds | |")
    for actors, rate in throughput.items():
        print(f"| end-to-end env steps/s, {actors} actor(s) | {rate:,.0f} | |")
    if throughput:
        best = max(throughput.values())
        print(
            f"| best end-to-end env steps/s | {best:,.0f} | >= 100k: "
            f"{'met' if best >= 100_000 else 'MISSED'} |"
        )
    print(f"| raw vector-env stepping, one core | {raw:,.0f} | (ceiling) |")


if __name__ == "__main__":
    main()
