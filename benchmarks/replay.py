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

Then, for 1, 16 and 256 producers (`--producers`: logical producers, threads in up to two
processes, each with its own fragment and `actors.max_inflight`-like window of calls in flight),
the wall time per fragment of four ways to hand a fragment to another process, as the actors
do at once:

  ray.put+get             ray.put of the encoded bytes and ray.get back, in the producer
  raw actor call          the bytes to a no-op threaded actor through `RaySink` (today's
                          transport without the replay service's work)
  put, ref to actor       ray.put in the producer, the reference to a no-op actor that
                          ray.gets it (the object-store data path: bytes stay out of the call)
  service insert          the bytes through `RaySink` to the replay service as
                          `deploy.topology.start_replay` starts it (a fifo of one fragment, so
                          no insert ever waits for the rate limiter)

Costs are the wall time of all producers divided by the fragments they sent (medians over the
rounds), and their ratio to ray.put+get.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import ray

# The repository first: run as a script, this file's own directory would come first on the path
# and `import replay` would find this very module instead of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loopback import LoopbackCluster
from deploy import topology
from deploy.workers.rollout import RaySink
from replay import codec
from replay.service import InsertResult, ReplayConfig, ReplayService
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
        core_state=np.zeros((2, n, 0), np.float32),
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


# -- many producers --------------------------------------------------------------------------

PRODUCER_WORKLOADS = {
    # name: (T, N, obs_shape, obs_dtype). CartPole as the job's defaults (64 envs x 16 steps);
    # Atari-shaped at about the size of a 20 x 16 Pong fragment with each frame stored once.
    "CartPole (T=16, N=64, 4 f32)": (16, 64, (4,), np.float32),
    "Atari (T=20, N=4, 4x84x84 u8)": (20, 4, (4, 84, 84), np.uint8),
}
#: The producer paths, each measured per fragment; the first is the baseline of the ratios.
PRODUCER_PATHS = ("ray.put+get", "raw actor call", "put, ref to actor", "service insert")


class NoopTarget:
    """Takes fragments and does nothing: the transport floor of each producer path."""

    def insert(self, data: bytes, timeout: float | None = None) -> InsertResult:
        return InsertResult.ACCEPTED if len(data) else InsertResult.REJECTED

    def take_ref(self, refs: list) -> bool:
        return len(ray.get(refs[0])) > 0


class ProducerHost:
    """`threads` logical producers in one process, each with its own message (a fragment
    encoded once with a fixed-width id whose counter is rewritten before every send, so the
    replay service never sees a duplicate id) and its own `RaySink` where a path has one."""

    def __init__(self, spec: tuple, host: int, threads: int, replay, target) -> None:
        t, n, obs_shape, obs_dtype = spec
        self._replay, self._target = replay, target
        self._messages = []
        for thread in range(threads):
            placeholder = f"p{host:02d}-{thread:04d}-".encode() + b"0" * 12
            fragment = make_fragment(t, n, obs_shape, obs_dtype, 0)
            fragment = dataclasses.replace(fragment, fragment_id=placeholder.decode())
            message = bytearray(codec.encode(fragment))
            offset = message.index(placeholder) + len(placeholder) - 12
            self._messages.append((message, offset))

    def run(self, path: str, seconds: float, window: int) -> tuple[int, float]:
        """All producers run `path` for about `seconds` (each sends at least one fragment);
        (fragments done, wall seconds). The clock starts once every thread is ready."""
        counts = [0] * len(self._messages)
        go = threading.Event()
        clock: list[float] = []
        threads = [
            threading.Thread(
                target=self._produce,
                args=(i, path, go, clock, window, counts),
                name=f"bench-producer-{i}",
            )
            for i in range(len(self._messages))
        ]
        for thread in threads:
            thread.start()
        clock.append(time.perf_counter() + seconds)
        start = time.perf_counter()
        go.set()
        for thread in threads:
            thread.join()
        return sum(counts), time.perf_counter() - start

    def _produce(self, i: int, path: str, go, clock: list, window: int, counts: list) -> None:
        message, offset = self._messages[i]
        serial = 0
        sink = None
        if path in ("raw actor call", "service insert"):
            sink = RaySink(self._replay if path == "service insert" else self._target, window)
        pending: collections.deque = collections.deque()
        go.wait()
        while serial == 0 or time.perf_counter() < clock[0]:
            serial += 1
            message[offset : offset + 12] = b"%012d" % serial
            if sink is not None:
                sink.put(message)
            elif path == "ray.put+get":
                ray.get(ray.put(message))
            else:
                pending.append(self._target.take_ref.remote([ray.put(message)]))
                while len(pending) > window:
                    ray.get(pending.popleft())
        if sink is not None:
            sink.flush()
            assert sink.rejected == 0, f"{path}: {sink.rejected} inserts refused"
        ray.get(list(pending))
        counts[i] = serial


def bench_producers(
    name: str, spec: tuple, producers: int, seconds: float, window: int, rounds: int
) -> list[tuple]:
    """Per-fragment cost of each producer path with `producers` producers in up to 2 processes,
    interleaved in `rounds` rounds; medians reported."""
    # A fifo of one: every insert evicts the fragment before, nothing ever blocks.
    replay = topology.start_replay(ReplayConfig.fifo_queue(1))
    target = ray.remote(NoopTarget).options(num_cpus=0, max_concurrency=64).remote()
    processes = min(producers, 2)
    hosts = [
        ray.remote(ProducerHost)
        .options(num_cpus=0)
        .remote(spec, h, len(range(h, producers, processes)), replay, target)
        for h in range(processes)
    ]
    for path in PRODUCER_PATHS:  # warm-up: first calls import and connect
        ray.get([h.run.remote(path, 0.2, window) for h in hosts])
    per_fragment: dict[str, list[float]] = {path: [] for path in PRODUCER_PATHS}
    for _ in range(rounds):
        for path in PRODUCER_PATHS:
            done = ray.get([h.run.remote(path, seconds / rounds, window) for h in hosts])
            count, elapsed = sum(c for c, _ in done), max(e for _, e in done)
            per_fragment[path].append(elapsed / count)
    stats = ray.get(replay.stats.remote())
    assert stats["inserted"] > 0 and not stats["rejected"], stats
    for actor in (*hosts, replay, target):
        ray.kill(actor)
    base = statistics.median(per_fragment[PRODUCER_PATHS[0]])
    rows = []
    for path in PRODUCER_PATHS:
        cost = statistics.median(per_fragment[path])
        rows.append((name, str(producers), path, f"{cost * 1e6:,.0f}", f"{cost / base:.1f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5, help="time per path, all rounds")
    parser.add_argument("--window", type=int, default=8, help="actor calls in flight")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per path")
    parser.add_argument(
        "--producers", default="1,16,256", help="producer counts of the producer table ('' skips)"
    )
    parser.add_argument(
        "--producer-seconds", type=float, default=6.0, help="time per path, all rounds"
    )
    parser.add_argument("--producer-window", type=int, default=2, help="inserts in flight each")
    parser.add_argument("--skip-single", action="store_true", help="only the producer table")
    args = parser.parse_args()
    # One node started by `ray start` (benchmarks/loopback.py), not an embedded Ray: its start
    # survives a loaded machine, and every process it starts is ended on the way out.
    cluster = LoopbackCluster(object_store_bytes=2 * 10**9)
    try:
        cluster.start_head(cpus=4)
        cluster.connect()
        rows, producer_rows = [], []
        for name, spec in WORKLOADS.items() if not args.skip_single else ():
            rows += bench(name, spec, args.seconds, args.window, args.rounds)
            print(f"{name}: done, load {_load()}", flush=True)
        for name, spec in PRODUCER_WORKLOADS.items():
            for producers in [int(p) for p in args.producers.split(",") if p]:
                producer_rows += bench_producers(
                    name, spec, producers, args.producer_seconds, args.producer_window, args.rounds
                )
                for row in producer_rows[-len(PRODUCER_PATHS) :]:
                    print("| " + " | ".join(row) + " |", flush=True)
    finally:
        ray.shutdown()
        cluster.stop()
    if rows:
        print("| workload | path | fragments/s | MB/s | x raw |")
        print("| --- | --- | ---: | ---: | ---: |")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        print()
    if producer_rows:
        print(f"Per fragment, {args.producer_window} in flight per producer, load {_load()}:")
        print("| workload | producers | path | us per fragment | x ray.put+get |")
        print("| --- | ---: | --- | ---: | ---: |")
        for r in producer_rows:
            print("| " + " | ".join(r) + " |")


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
