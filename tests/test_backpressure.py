"""Backpressure without starvation: a replay actor whose rate limiter holds inserts back still
serves the learner's samples and the driver's stats at once, and every held-back insert is sent
again until it is stored (issue 11: the run with 48 actors that hit the 60 s call timeouts)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray

from deploy import topology
from deploy.workers.rollout import RaySink
from replay import codec
from replay.service import ReplayConfig, ReplayService
from replay.trajectory import Fragment


def _fragment(fragment_id: str) -> Fragment:
    t, n = 4, 2
    zeros = np.zeros((t, n), bool)
    return Fragment(
        obs=np.zeros((t + 1, n, 4), np.float32),
        actions=np.zeros((t, n), np.int64),
        rewards=np.ones((t, n), np.float32),
        terminated=zeros,
        truncated=zeros,
        autoreset=zeros,
        behaviour_logp=np.full((t, n), -0.7, np.float32),
        core_state=np.zeros((2, n, 0), np.float32),
        policy_version=0,
        actor_id=0,
        fragment_id=fragment_id,
        episode_returns=np.zeros(0, np.float32),
        episode_lengths=np.zeros(0, np.int32),
    )


# -- no call starves another --------------------------------------------------------------------

#: Inserts in flight in the starvation tests: 4 producers x (max_inflight 2 + 1), six times the
#: 2 insert threads the replay gets there.
STARVE_PRODUCERS, STARVE_EACH = 4, 6


def _held_back_config() -> ReplayConfig:
    # One sample per insert, tolerance 1: two inserts go, then every insert waits for samples.
    return ReplayConfig.uniform_replay(samples_per_insert=1.0, tolerance=1.0, seed=0)


@ray.remote(num_cpus=0)
def _sink_producer(replay, producer: int) -> dict:
    """A rollout actor's sink: `STARVE_EACH` fragments through a `RaySink`, then flush."""
    sink = RaySink(replay, max_inflight=2)
    for i in range(STARVE_EACH):
        sink.put(codec.encode(_fragment(f"p{producer}-{i:04d}")))
    sink.flush()
    return {"accepted": sink.accepted, "rejected": sink.rejected, "held_back": sink.held_back}


def test_one_thread_pool_deadlocks_when_inserts_are_held_back(local_ray):
    """Today's failure, reproduced: with one pool of threads, held-back inserts take every
    thread and the driver's stats (like the learner's sample, the only call that could release
    them) waits behind them."""
    service = ray.remote(num_cpus=0, max_concurrency=2)(ReplayService).remote(_held_back_config())
    blocked = [
        service.insert.remote(codec.encode(_fragment(f"p0-{i:04d}")), None) for i in range(6)
    ]
    # Two go in (the ratio lets them); the next two take both threads and wait for good.
    accepted, _ = ray.wait(blocked, num_returns=2, timeout=120)
    assert len(accepted) == 2
    with pytest.raises(ray.exceptions.GetTimeoutError):
        ray.get(service.stats.remote(), timeout=3.0)
    ray.kill(service)


def test_held_back_inserts_leave_sample_and_stats_a_thread_and_are_retried(local_ray):
    """The same load on the job's replay actor: inserts answer HELD_BACK after a bounded wait
    and the sinks send them again, while stats and samples run on their own threads; every
    fragment ends up accepted, none lost and none counted twice."""
    replay = topology.start_replay(_held_back_config(), threads={"insert": 2})
    producers = [_sink_producer.remote(replay, p) for p in range(STARVE_PRODUCERS)]
    total = STARVE_PRODUCERS * STARVE_EACH
    ray.get(replay.node_id.remote(), timeout=120)  # started
    deadline = time.monotonic() + 120
    # The learner has not sampled yet: inserts pile up behind the ratio and are held back ...
    while (stats := ray.get(replay.stats.remote(), timeout=30))["insert_timeouts"] < 4:
        assert stats["inserted"] <= 2
        assert time.monotonic() < deadline, f"no insert was held back: {stats}"
        time.sleep(0.1)
    # ... and the learner's sample still gets a thread at once (it waits for no insert).
    sampled, running = 0, producers
    while running or sampled < total:
        assert time.monotonic() < deadline, "the producers made no progress"
        fragments = ray.get(replay.sample_fragments.remote(1, 0, 0.5), timeout=30)
        sampled += len(fragments or [])
        _, running = ray.wait(running, num_returns=len(running), timeout=0)
    results = ray.get(producers, timeout=30)
    stats = ray.get(replay.stats.remote(), timeout=30)
    assert sum(r["accepted"] for r in results) == stats["inserted"] == total
    assert sum(r["rejected"] for r in results) == 0 and stats["rejected"] == {}
    # Every HELD_BACK answer was sent again: the service counted each one it gave.
    assert sum(r["held_back"] for r in results) == stats["insert_timeouts"] >= 4
    ray.kill(replay)
