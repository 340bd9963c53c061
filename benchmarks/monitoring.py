"""What monitoring costs: one TensorBoard point, and one driver poll at 1 to N actors.

    python benchmarks/monitoring.py [--actors 1 8 32] [--polls 200]

A point (`deploy.report.Reporter.write_point`) writes every scalar a run logs; here a
`MetricsWriter` writes that many tags per point into a temporary directory. A poll here sends
one `stats()` call to each of N actors and waits for all the answers with one `ray.wait` (a
run's poll asks at most `deploy.job.ASKS_PER_POLL` actors and takes the answers of earlier
polls without waiting); each actor is a Ray actor answering a stats dict like a rollout actor's
(counters plus a few finished episodes), with no env stepping behind it, so the numbers are the
control plane's alone: the driver's CPU time per poll (what `deploy.points` bounds to a tenth
of a CPU) and its wall time, and each actor's CPU time per `stats()` call, Ray's own threads in
its process included. Prints Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray

from actors.config import ActorStats
from deploy import metrics as tags
from deploy.points import MIN_TICK_S, POLL_COST_RATIO

#: Scalars per point in a real run (the short end-to-end test writes this many tags).
TAGS_PER_POINT = 60


class StatsActor:
    """Answers `stats()` like a rollout actor between two polls: counters, two episodes."""

    def __init__(self, actor_id: int):
        self._id = actor_id
        self._calls = 0

    def stats(self) -> dict:
        self._calls += 1
        stats = ActorStats(
            actor_id=self._id,
            env_steps=self._calls * 1024,
            fragments=self._calls,
            policy_version=self._calls,
            episode_returns=[200.0, 180.5],
            episode_lengths=[200, 181],
            weight_syncs=self._calls,
            max_lag_waits=0,
            env_errors=0,
        )
        return {**dataclasses.asdict(stats), "alive": True, "error": None, "node_id": "n"}

    def cpu_s(self) -> float:
        return time.process_time()


def point_cost(points: int) -> float:
    """Microseconds of driver time to write one point of `TAGS_PER_POINT` scalars."""
    with tempfile.TemporaryDirectory() as run_dir:
        writer = tags.MetricsWriter(run_dir)
        values = {f"bench/tag_{i}": float(i) for i in range(TAGS_PER_POINT)}
        start = time.perf_counter()
        for step in range(points):
            writer.scalars(step, values)
        spent = time.perf_counter() - start
        writer.close()
    return spent / points * 1e6


def poll_cost(num_actors: int, polls: int) -> dict[str, float]:
    """Driver CPU and wall per poll of `num_actors` actors, and actor CPU per stats call."""
    remote = ray.remote(StatsActor).options(num_cpus=0, max_concurrency=4)
    handles = [remote.remote(i) for i in range(num_actors)]
    ray.get([h.cpu_s.remote() for h in handles])
    actor_cpu = ray.get([h.cpu_s.remote() for h in handles])
    cpu, wall = [], []
    for _ in range(polls):
        start_cpu, start = time.process_time(), time.perf_counter()
        refs = [h.stats.remote() for h in handles]
        ray.wait(refs, num_returns=len(refs), timeout=10.0)
        ray.get(refs)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    actor_cpu = [
        after - before
        for before, after in zip(
            actor_cpu, ray.get([h.cpu_s.remote() for h in handles]), strict=True
        )
    ]
    for handle in handles:
        ray.kill(handle)
    return {
        "driver_cpu_ms": statistics.median(cpu) * 1e3,
        "wall_ms_p50": statistics.median(wall) * 1e3,
        "wall_ms_p99": sorted(wall)[math.ceil(0.99 * len(wall)) - 1] * 1e3,
        "actor_cpu_us_per_call": statistics.median(actor_cpu) / polls * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--polls", type=int, default=200)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"one point of {TAGS_PER_POINT} scalars: {point_cost(2000):.0f} us of driver time")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    print(f"\nload average {load:.1f} on {os.cpu_count()} cores\n")
    print(
        "| actors | driver CPU / poll | poll wall p50 | poll wall p99 | actor CPU / stats call |"
        " poll interval (>= 10x CPU) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in args.actors:
        r = poll_cost(n, args.polls)
        interval = max(MIN_TICK_S, POLL_COST_RATIO * r["driver_cpu_ms"] / 1e3)
        print(
            f"| {n} | {r['driver_cpu_ms']:.2f} ms | {r['wall_ms_p50']:.2f} ms | "
            f"{r['wall_ms_p99']:.2f} ms | {r['actor_cpu_us_per_call']:.0f} us | "
            f"{interval * 1e3:.0f} ms |"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
