"""ReplayService as a real threaded Ray actor: many producers, one learner, nothing lost."""

from __future__ import annotations

import collections
import time

import numpy as np
import ray

from replay import codec
from replay.service import InsertResult, ReplayConfig, ReplayService
from replay.trajectory import Fragment

PRODUCERS = 8
PER_PRODUCER = 60


def _service(config: ReplayConfig):
    # What deploy/ does at the edge: a threaded actor, so a blocked sample does not block inserts.
    return ray.remote(num_cpus=0, max_concurrency=PRODUCERS + 4)(ReplayService).remote(config)


def _fragment(fragment_id: str, policy_version: int) -> Fragment:
    t, n = 8, 4
    zeros = np.zeros((t, n), bool)
    return Fragment(
        obs=np.full((t + 1, n, 4), policy_version, np.float32),
        actions=np.zeros((t, n), np.int64),
        rewards=np.ones((t, n), np.float32),
        terminated=zeros,
        truncated=zeros,
        autoreset=zeros,
        behaviour_logp=np.full((t, n), -0.7, np.float32),
        core_state=np.zeros((2, n, 0), np.float32),
        policy_version=policy_version,
        actor_id=int(fragment_id.split("-")[0][1:]),
        fragment_id=fragment_id,
        episode_returns=np.zeros(0, np.float32),
        episode_lengths=np.zeros(0, np.int32),
    )


@ray.remote(num_cpus=0)
def _produce(service, producer: int, count: int) -> list[str]:
    """One rollout actor: encodes and inserts `count` fragments; returns the ids accepted."""
    accepted = []
    for i in range(count):
        fragment_id = f"p{producer}-{i:04d}"
        # Producer 7 is a slow actor that never syncs its weights: its data goes stale.
        version = 0 if producer == 7 else i // 6
        if ray.get(service.insert.remote(codec.encode(_fragment(fragment_id, version)), 30.0)):
            accepted.append(fragment_id)
    return accepted


def test_fifo_with_8_producers_delivers_each_fragment_once_or_counts_it(local_ray):
    config = ReplayConfig.fifo_queue(capacity_fragments=32, max_staleness=3)
    service = _service(config)
    producers = [_produce.remote(service, p, PER_PRODUCER) for p in range(PRODUCERS)]
    # Let the queue overflow before the learner starts, so eviction is exercised for sure.
    deadline = time.monotonic() + 60
    while ray.get(service.stats.remote(), timeout=60)["inserted"] < 100:
        assert time.monotonic() < deadline, "producers made no progress"
        time.sleep(0.05)
    delivered: list[str] = []
    learner_version = 0
    pending = list(producers)
    while True:
        batch = ray.get(service.sample.remote(8, learner_version, 0.2), timeout=60)
        if batch is not None:
            delivered.extend(batch.fragment_ids)
            learner_version = len(delivered) // 40
            # A batch is one [T, 8 * N] block; every column carries its fragment's version.
            assert batch.obs.shape == (9, 32, 4)
            np.testing.assert_array_equal(batch.obs[0, :, 0], batch.policy_version)
        if pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        elif batch is None:
            break
    while batch := ray.get(service.sample.remote(1, learner_version, 0.1), timeout=60):
        delivered.extend(batch.fragment_ids)  # the last partial batch
    accepted = [i for ids in ray.get(producers, timeout=120) for i in ids]
    stats = ray.get(service.stats.remote(), timeout=60)

    assert len(accepted) == PRODUCERS * PER_PRODUCER
    assert len(delivered) == len(set(delivered)), "a fragment was delivered twice"
    assert set(delivered) <= set(accepted)
    assert stats["inserted"] == len(accepted)
    assert stats["sampled"] == len(delivered)
    assert stats["size_fragments"] == 0
    assert stats["rejected"] == {}
    # Nothing lost silently: whatever was not delivered was counted as evicted or stale.
    assert stats["evicted"] + stats["dropped_stale"] == len(accepted) - len(delivered)
    assert stats["evicted"] >= 100 - config.capacity_fragments
    assert stats["lag"]["max"] <= config.max_staleness
    # fifo: each producer's fragments come out in the order it inserted them.
    per_producer = collections.defaultdict(list)
    for fragment_id in delivered:
        per_producer[fragment_id.split("-")[0]].append(fragment_id)
    for ids in per_producer.values():
        assert ids == sorted(ids)


def test_actor_rejects_bad_bytes_and_serves_a_waiting_learner(local_ray):
    service = _service(ReplayConfig.fifo_queue())
    assert ray.get(service.insert.remote(b"\x92\x01\x02", 1.0), timeout=60) is InsertResult.REJECTED
    waiting = service.sample.remote(1, 0, 30.0)  # blocks inside the actor on one thread ...
    deadline = time.monotonic() + 30
    while ray.get(service.stats.remote(), timeout=60)["sample_waits"] < 1:
        assert time.monotonic() < deadline, "the sample never started waiting"
        time.sleep(0.02)
    # ... while another thread of the same actor takes the insert that wakes it up.
    assert ray.get(service.insert.remote(codec.encode(_fragment("p0-0000", 0)), 5.0), timeout=60)
    batch = ray.get(waiting, timeout=60)
    assert batch.fragment_ids == ("p0-0000",)
    stats = ray.get(service.stats.remote(), timeout=60)
    assert stats["rejected"] == {"structure": 1}
    assert stats["sample_waits"] == 1 and stats["sample_timeouts"] == 0
