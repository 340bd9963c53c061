"""Weight broadcast on a real local Ray: a consumer ends up with the learner's weights, and the
object store keeps only the newest version."""

from __future__ import annotations

import re
import time

import numpy as np
import ray
import torch

from deploy.weights import fetch_weights, publisher, put_weights
from learner.broadcast import WeightStore
from learner.policy import PolicySpec, load_numpy_state_dict, make_policy, state_dict_to_numpy

torch.set_num_threads(1)

SPEC = PolicySpec((4,), "float32", "discrete", 2)


class Consumer:
    """Stands in for a rollout actor: its own policy copy, synced through the store."""

    def __init__(self, spec_dict: dict, store):
        torch.set_num_threads(1)
        torch.manual_seed(123)
        self.policy = make_policy(PolicySpec.from_dict(spec_dict))
        self.store = store
        self.version = -1

    def sync(self) -> bool:
        fetched = fetch_weights(self.store, self.version)
        if fetched is None:
            return False
        self.version, weights = fetched
        load_numpy_state_dict(self.policy, weights)
        return True

    def weights(self) -> tuple[int, dict[str, np.ndarray]]:
        return self.version, state_dict_to_numpy(self.policy)


def _plasma_objects() -> int:
    from ray._private.internal_api import memory_summary

    # The address of *this* cluster: other Ray instances may run on the same machine.
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    match = re.search(r"Plasma memory usage \d+ MiB, (\d+) objects", text)
    assert match, text
    return int(match.group(1))


def test_store_keeps_newest_and_ignores_older_versions():
    store = WeightStore()
    assert store.version() == -1 and store.latest() is None
    assert store.latest_if_newer(-1) is None
    store.publish(3, ["ref3"])
    store.publish(2, ["ref2"])  # late arrival of an older publish
    assert store.version() == 3 and store.latest() == (3, ["ref3"])
    store.publish(4, ["ref4"])
    assert store.latest() == (4, ["ref4"])
    assert store.latest_if_newer(3) == (4, ["ref4"])
    assert store.latest_if_newer(4) is None and store.latest_if_newer(9) is None
    assert store.stats() == {"version": 4, "published": 2}


def test_broadcast_changes_consumer_parameters_to_learners(local_ray):
    store = ray.remote(num_cpus=0)(WeightStore).remote()
    consumer = ray.remote(num_cpus=0)(Consumer).remote(SPEC.to_dict(), store)
    torch.manual_seed(7)
    learner_policy = make_policy(SPEC)
    mine = state_dict_to_numpy(learner_policy)

    assert ray.get(consumer.sync.remote(), timeout=60) is False  # nothing published yet
    _, theirs = ray.get(consumer.weights.remote(), timeout=60)
    assert not all(np.array_equal(mine[k], theirs[k]) for k in mine)

    publish = publisher(store)
    publish(1, mine)
    deadline = time.monotonic() + 30
    while ray.get(store.version.remote(), timeout=30) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert ray.get(consumer.sync.remote(), timeout=60) is True
    version, theirs = ray.get(consumer.weights.remote(), timeout=60)
    assert version == 1
    for key, value in mine.items():
        np.testing.assert_array_equal(theirs[key], value)
    # Up to date: the next sync fetches nothing.
    assert ray.get(consumer.sync.remote(), timeout=60) is False

    # A training step later the consumer follows again, to the new values.
    with torch.no_grad():
        learner_policy.policy_head.weight.add_(0.5)
    mine = state_dict_to_numpy(learner_policy)
    ray.get(store.publish.remote(2, put_weights(2, mine)), timeout=30)
    assert ray.get(consumer.sync.remote(), timeout=60) is True
    version, theirs = ray.get(consumer.weights.remote(), timeout=60)
    assert version == 2
    np.testing.assert_array_equal(theirs["policy_head.weight"], mine["policy_head.weight"])


def test_object_store_holds_only_newest_after_many_publishes(local_ray):
    store = ray.remote(num_cpus=0)(WeightStore).remote()
    publish = publisher(store)
    baseline = _plasma_objects()
    # 2 MB per version: well above Ray's inline threshold, so each lands in plasma.
    for version in range(1, 41):
        publish(version, {"w": np.full(500_000, version, np.float32)})
    deadline = time.monotonic() + 30
    while ray.get(store.version.remote(), timeout=30) < 40:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # Frees are asynchronous; allow them a moment, then the count must be flat.
    while _plasma_objects() > baseline + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _plasma_objects() <= baseline + 1
    fetched = fetch_weights(store, 0)
    assert fetched is not None and fetched[0] == 40
    assert float(fetched[1]["w"][0]) == 40.0
    assert fetch_weights(store, 40) is None
