"""Weight broadcast through Ray's object store, around the learner's `WeightStore`.

The learner puts `(version, numpy state dict)` into the object store once per publish
(`put_weights`, through the `publisher` callable it is given) and hands the reference to the
`WeightStore` actor, which keeps only the newest one. A rollout actor (`RayWeightSource`) makes
one store call, `latest_if_newer`, and fetches the weights only when they are newer than its
own. Many actors fetching the same version read one shared-memory copy per node.

References are passed wrapped in a list: Ray resolves an `ObjectRef` given as a top-level
argument of a remote call into its value, which would copy the weights into the store actor.
Inside a list the reference travels as a reference, and the store becomes a borrower of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import ray

#: Seconds to wait on the store or the object store before giving up.
FETCH_TIMEOUT_S = 60.0


def put_weights(version: int, weights: dict[str, np.ndarray]) -> list[Any]:
    """Put `(version, weights)` into the object store once; returns `[ObjectRef]`, ready for
    `WeightStore.publish(version, ...)` (the list keeps Ray from resolving the reference)."""
    return [ray.put((int(version), weights))]


def fetch_weights(
    store_handle: Any, have_version: int, *, timeout: float = FETCH_TIMEOUT_S
) -> tuple[int, dict[str, np.ndarray]] | None:
    """The store's newest `(version, weights)` when it is newer than `have_version`, else None.

    `store_handle` is the Ray actor handle of a `WeightStore`: one `latest_if_newer` call, plus
    the weights' transfer when there is something new. The returned arrays may be read-only
    views of shared memory: copy them into a module with `learner.policy.load_numpy_state_dict`,
    do not write to them.
    """
    latest = ray.get(store_handle.latest_if_newer.remote(have_version), timeout=timeout)
    if latest is None:
        return None
    _, refs = latest
    return ray.get(refs[0], timeout=timeout)


def publisher(store_handle: Any) -> Callable[[int, dict[str, np.ndarray]], None]:
    """A `publish(version, weights)` callable for `Learner`: put once, hand the ref over.

    The remote call is not waited on (the learner must not block on actors); the pending call
    keeps the reference alive until the store holds it.
    """

    def publish(version: int, weights: dict[str, np.ndarray]) -> None:
        store_handle.publish.remote(version, put_weights(version, weights))

    return publish


class RayWeightSource:
    """`actors.ports.WeightSource` over the weight-store actor: a sync is one store call,
    plus one object fetch when there are newer weights. Counts both (the actor's stats)."""

    def __init__(self, store: Any):
        self._store = store
        self.calls = 0  # store calls (`latest_if_newer`), one per sync
        self.transfers = 0  # weight fetches from the object store, one per new version loaded

    def fetch(self, have_version: int) -> tuple[int, dict[str, np.ndarray]] | None:
        self.calls += 1
        got = fetch_weights(self._store, have_version)
        self.transfers += got is not None
        return got
