"""Chaos: a CartPole run during which a random component is killed every `--every` seconds.

    python benchmarks/chaos.py [--duration 180] [--every 20] [--seed 0] [--actors 2]

Every `--every` seconds one of {a rollout actor, the replay service, the learner} is picked at
random (in shuffled rounds of the three, so each is hit as often) and its worker process is
SIGKILLed (an actor is `ray.kill`ed instead half the time). A
fault counts as recovered when the driver has counted the matching restart (`actors/restarts`,
`replay/restarts`, `learner/restarts`) and, for an actor, the fleet is back to its size. The run
goes on for `--duration` seconds whatever the return (the target does not stop it), then prints
faults injected and recovered, fragments lost (`replay/lost_fragments`: acknowledged inserts the
restarted replay service had no record of), and whether and when the mean return of the last
100 episodes reached 475.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.config import load_config
from deploy.job import Job, train

TARGET = 475.0


class Monkey:
    """`on_poll` hook: inject a fault every `every` s, watch for recoveries, stop at the end."""

    def __init__(self, every: float, duration: float, seed: int, num_actors: int):
        self.every, self.duration, self.num_actors = every, duration, num_actors
        self.rng = random.Random(seed)
        self.start = time.monotonic()
        self.next_fault = self.start + every
        self.injected: list[str] = []
        self.recovered: list[tuple[str, float]] = []
        self.waiting: list[tuple[str, int, float]] = []  # (kind, counter before, time)
        self.reached: tuple[int, float] | None = None
        self._round: list[str] = []

    def __call__(self, job: Job) -> bool:
        now = time.monotonic()
        self._check_recoveries(job, now)
        if self.reached is None and job.fleet.episodes.reached(TARGET):
            self.reached = (job.env_steps, now - self.start)
            print(f"\nchaos: target {TARGET:g} reached at {job.env_steps:,} env steps", flush=True)
        if now >= self.next_fault:
            self.next_fault = now + self.every
            self._inject(job, now)
        return now - self.start >= self.duration

    def _counter(self, job: Job, kind: str) -> int:
        return {
            "actor": job.fleet.restarts,
            "replay": job.faults.replay_restarts,
            "learner": job.faults.learner_restarts,
        }[kind.split()[0]]

    def _inject(self, job: Job, now: float) -> None:
        topo = job.topology
        if not self._round:
            self._round = ["actor", "replay", "learner"]
            self.rng.shuffle(self._round)
        kind = self._round.pop()
        try:
            if kind == "actor":
                actor_id = self.rng.choice(sorted(topo.actors))
                handle = topo.actors[actor_id]
                if self.rng.random() < 0.5:
                    ray.kill(handle)
                    kind = "actor ray.kill"
                else:
                    os.kill(ray.get(handle.pid.remote(), timeout=30), signal.SIGKILL)
                    kind = "actor SIGKILL"
            else:
                handle = topo.shards[0] if kind == "replay" else topo.learner
                os.kill(ray.get(handle.pid.remote(), timeout=30), signal.SIGKILL)
                kind = f"{kind} SIGKILL"
        except (ray.exceptions.RayError, TimeoutError, ProcessLookupError) as exc:
            # Still restarting from the previous fault: skip this one.
            print(f"\nchaos: could not inject a {kind} fault: {exc}", flush=True)
            return
        print(f"\nchaos: {now - self.start:6.1f} s: {kind}", flush=True)
        self.injected.append(kind)
        self.waiting.append((kind, self._counter(job, kind), now))

    def _check_recoveries(self, job: Job, now: float) -> None:
        still = []
        for kind, before, when in self.waiting:
            done = self._counter(job, kind) > before
            if kind.startswith("actor"):
                done = done and job.fleet.size == self.num_actors and not job.fleet.pending
            if done:
                self.recovered.append((kind, now - when))
            else:
                still.append((kind, before, when))
        self.waiting = still


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of training")
    parser.add_argument("--every", type=float, default=20.0, help="seconds between faults")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault choices")
    parser.add_argument("--actors", type=int, default=1, help="rollout actors (64 envs in all)")
    parser.add_argument("--logdir", default=None, help="where the run logs (default: a temp dir)")
    args = parser.parse_args()
    logdir = args.logdir or tempfile.mkdtemp(prefix="offpg-chaos-")
    config = load_config(
        None,
        [
            f"run.num_actors={args.actors}",
            f"actors.num_envs={max(64 // args.actors, 1)}",
            "run.target_return=none",
            "run.max_env_steps=1000000000",
            "run.log_every=1.0",
            "learner.checkpoint_every=10.0",
        ],
        extra={"run.logdir": logdir, "run.name": "chaos"},
    )
    monkey = Monkey(args.every, args.duration, args.seed, args.actors)
    summary = train(config, on_poll=monkey)
    kinds = sorted(set(monkey.injected))
    print()
    print(
        f"chaos: {args.duration:.0f} s of CartPole-v1, {args.actors} actor(s), one fault "
        f"every {args.every:g} s (seed {args.seed}); logs in {summary.run_dir}"
    )
    print(
        f"  faults injected:  {len(monkey.injected)}  "
        + ", ".join(f"{k} x{monkey.injected.count(k)}" for k in kinds)
    )
    recovery = [s for _, s in monkey.recovered]
    print(
        f"  faults recovered: {len(monkey.recovered)}"
        + (
            f"  (detected and restarted within {min(recovery):.1f}-{max(recovery):.1f} s)"
            if recovery
            else ""
        )
    )
    if monkey.waiting:
        print(f"  still recovering at the end: {[k for k, _, _ in monkey.waiting]}")
    print(
        f"  restarts counted: actors {summary.actor_restarts}, replay {summary.replay_restarts}, "
        f"learner {summary.learner_restarts}"
    )
    print(f"  fragments lost:   {summary.lost_fragments}")
    if monkey.reached:
        print(
            f"  target {TARGET:g} reached: yes, at {monkey.reached[0]:,} env steps "
            f"({monkey.reached[1]:.0f} s)"
        )
    else:
        print(f"  target {TARGET:g} reached: no")
    print(
        f"  final mean return: {summary.return_mean:.1f}, {summary.env_steps:,} env steps, "
        f"learner v{summary.learner_version}"
    )
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
