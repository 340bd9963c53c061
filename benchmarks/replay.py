"""Replay throughput through a Ray actor, beside raw msgpack and raw Ray transfer of the same bytes.

    python benchmarks/replay.py [--seconds 2.5] [--window 8] [--rounds 5]

For a CartPole-sized fragment (T=32, N=64, obs 4 float32) and an Atari-sized one (T=20, N=4,
obs 4x84x84 uint8) it measures, each for about `--seconds` split into interleaved rounds:

  encode / decode         codec.encode and codec.decode in this process
  ray.put+get             a raw ray.put then ray.get of the encoded bytes in this process
  raw actor call          the encoded bytes sent to a no-op threaded actor (`window` in flight)
  service insert          the same bytes to ReplayService.insert on a threaded actor
  raw batch transfer      a no-op actor returning a pre-stacked Batch of the sample's size
  sample (service stack)  ReplayService.sample: stacked in the actor, one Batch crosses Ray
  sample (learner stack)  ReplayService.sample_fragments, then Batch.stack in this process
  service CPU: ...        the same two sample calls in process: the service's own cost

and prints a Markdown table of medians over the rounds; `x raw` is the median per-round ratio
of the service's time per fragment to the raw transfer's (the target is <= 2). MB/s counts
encoded fragment bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray

# The repository first: run as a script, this file's own directory would come first on the path
# and `import replay` would find this very module instead of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replay import codec
from replay.service import ReplayConfig, ReplayService
from replay.trajectory import Batch, Fragment

WORKLOADS = {
    # name: (T, N, obs_shape, obs_dtype, sample batch size in fragments)
    "CartPole (T=32, N=64, 4 f32)": (32, 64, (4,), np.float32, 16),
    "Atari (T=20, N=4, 4x84x84 u8)": (20, 4, (4, 84, 84), np.uint8, 8),
}


def make_fragment(t, n, obs_shape, obs_dtype, index: int) -> Fragment:
    rng = np.random.default_rng(index)
    if obs_dtype == np.uint8:
        obs = rng.integers(0, 256, (t + 1, n, *obs_shape), dtype=np.uint8)
    else:
        obs = rng.standard_normal((t + 1, n, *obs_shape)).astype(obs_dtype)
    zeros = np.zeros((t, n), bool)
    return Fragment(
        obs=obs,
        actions=rng.integers(0, 4, (t, n)).astype(np.int64),
        rewards=rng.standard_normal((t, n)).astype(np.float32),
        terminated=zeros,
        truncated=zeros,
        autoreset=zeros,
        behaviour_logp=-rng.random((t, n)).astype(np.float32),
        policy_version=0,
        actor_id=0,
        fragment_id=f"bench-{index}",
        episode_returns=np.zeros(0, np.float32),
        episode_lengths=np.zeros(0, np.int32),
    )


class RawSink:
    """The baseline actor: takes bytes and hands back a ready Batch, doing nothing else."""

    def __init__(self, batch: Batch) -> None:
        self._batch = batch

    def take(self, data: bytes, timeout: float | None = None) -> bool:
        return len(data) > 0

    def batch(self) -> Batch:
        return self._batch


def timed(seconds: float, step) -> tuple[int, float]:
    """Run `step()` (which returns how many fragments it handled) for about `seconds`."""
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        count += step()
    return count, elapsed


def pipelined(seconds: float, submit, window: int) -> tuple[int, float]:
    """Keep `window` actor calls in flight for about `seconds`; count completed calls."""
    inflight = [submit(i) for i in range(window)]
    count, i, start = 0, window, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        done, inflight = ray.wait(inflight, num_returns=1)
        ray.get(done)
        count += 1
        inflight.append(submit(i))
        i += 1
    ray.get(inflight)
    return count, elapsed


def bench(name: str, spec, seconds: float, window: int, rounds: int) -> list[tuple]:
    """All paths of one workload, interleaved in `rounds` short rounds; medians reported.

    The machine this runs on may be shared: interleaving puts every path under the same
    background load, and the ratio is taken within each round before the median.
    """
    t, n, obs_shape, obs_dtype, batch_size = spec
    fragments = [make_fragment(t, n, obs_shape, obs_dtype, i) for i in range(64)]
    encoded = [codec.encode(f) for f in fragments]
    size_mb = len(encoded[0]) / 1e6
    stacked = Batch.stack(fragments[:batch_size])
    actor_options = {"num_cpus": 0, "max_concurrency": window + 4}
    sink = ray.remote(**actor_options)(RawSink).remote(stacked)
    # A fifo queue of 32: inserts never block and each of the 64 messages has been evicted
    # (or sampled) before it comes round again, so no insert is refused as a duplicate.
    queue = ray.remote(**actor_options)(ReplayService).remote(ReplayConfig.fifo_queue(32))
    replay = ray.remote(**actor_options)(ReplayService).remote(
        ReplayConfig.uniform_replay(capacity_fragments=64, seed=0)
    )
    ray.get([replay.insert.remote(e) for e in encoded] + [sink.take.remote(b"warm-up")])
    local = ReplayService(ReplayConfig.uniform_replay(capacity_fragments=64, seed=0))
    for fragment in fragments:
        local.insert_fragment(fragment)
    k = iter(range(10**9))
    q = iter(range(10**9))  # one running index: messages come round in order, 64 apart
    each = seconds / rounds
    paths = {
        # path: (measure() -> (fragments, seconds), baseline path for the ratio)
        "encode": (lambda: timed(each, lambda: codec.encode(fragments[next(k) % 64]) and 1), None),
        "decode": (lambda: timed(each, lambda: codec.decode(encoded[next(k) % 64]) and 1), None),
        "ray.put+get": (
            lambda: timed(each, lambda: ray.get(ray.put(encoded[next(k) % 64])) and 1),
            None,
        ),
        "raw actor call": (
            lambda: pipelined(each, lambda _: sink.take.remote(encoded[next(k) % 64]), window),
            None,
        ),
        "service insert": (
            lambda: pipelined(each, lambda _: queue.insert.remote(encoded[next(q) % 64]), window),
            "raw actor call",
        ),
        "raw batch transfer": (
            lambda: timed(each, lambda: ray.get(sink.batch.remote()) and batch_size),
            None,
        ),
        "sample (service stack)": (
            lambda: timed(
                each, lambda: ray.get(replay.sample.remote(batch_size, 0)) and batch_size
            ),
            "raw batch transfer",
        ),
        "sample (learner stack)": (
            lambda: timed(
                each,
                lambda: (
                    Batch.stack(ray.get(replay.sample_fragments.remote(batch_size, 0)))
                    and batch_size
                ),
            ),
            "raw batch transfer",
        ),
        # The service's own time per call, in process: what a shared service spends per batch.
        "service CPU: sample": (
            lambda: timed(each, lambda: local.sample(batch_size, 0) and batch_size),
            None,
        ),
        "service CPU: sample_fragments": (
            lambda: timed(each, lambda: local.sample_fragments(batch_size, 0) and batch_size),
            None,
        ),
    }
    rates: dict[str, list[float]] = {path: [] for path in paths}
    ratios: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(rounds):
        for path, (measure, _) in paths.items():
            count, elapsed = measure()
            rates[path].append(count / elapsed)
        for path, (_, baseline) in paths.items():
            if baseline:
                ratios[path].append(rates[baseline][-1] / rates[path][-1])
    stats = ray.get(queue.stats.remote())
    assert stats["inserted"] > 0 and not stats["rejected"], stats
    for actor in (sink, queue, replay):
        ray.kill(actor)
    rows = []
    for path in paths:
        per_s = statistics.median(rates[path])
        ratio = f"{statistics.median(ratios[path]):.2f}" if ratios[path] else ""
        rows.append((name, path, f"{per_s:,.0f}", f"{per_s * size_mb:,.0f}", ratio))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5, help="time per path, all rounds")
    parser.add_argument("--window", type=int, default=8, help="actor calls in flight")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per path")
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        rows = []
        for name, spec in WORKLOADS.items():
            rows += bench(name, spec, args.seconds, args.window, args.rounds)
    finally:
        ray.shutdown()
    print("| workload | path | fragments/s | MB/s | x raw |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
