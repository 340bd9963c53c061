"""Weight broadcast through Ray's object store.

The learner puts `(version, numpy state dict)` into the object store once per publish
(`put_weights`) and hands the reference to the `WeightStore`, which keeps only the newest one.
Rollout actors ask the store for its version (a few bytes) and fetch the weights only when they
are behind (`fetch_weights`). Many actors fetching the same version read one shared-memory copy
per node.

References are passed wrapped in a list: Ray resolves an `ObjectRef` given as a top-level
argument of a remote call into its value, which would copy the weights into the store actor.
Inside a list the reference travels as a reference, and the store becomes a borrower of it.

`WeightStore` is a plain class; `deploy/` wraps it with `ray.remote(...)` (STYLE item 5).
`put_weights` and `fetch_weights` need a running Ray; the store itself does not.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

#: Seconds to wait on the store or the object store before giving up.
FETCH_TIMEOUT_S = 60.0


class WeightStore:
    """Holds the newest `(version, [ObjectRef])` and nothing older.

    A publish with a version not newer than the held one is ignored (publishes can arrive out of
    order when several calls are in flight), so `version()` never goes backwards.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = -1
        self._ref: Any = None
        self._published = 0

    def publish(self, version: int, weights_ref: Any) -> None:
        """Replace the held reference with `weights_ref` (normally `[ObjectRef]`) for `version`.

        Dropping the previous reference lets Ray free the older weights once no actor still
        reads them, so a long run does not grow the object store.
        """
        with self._lock:
            if version <= self._version:
                return
            self._version = int(version)
            self._ref = weights_ref
            self._published += 1

    def version(self) -> int:
        """The newest published version, or -1 before the first publish. Cheap: no weights."""
        with self._lock:
            return self._version

    def latest(self) -> tuple[int, Any] | None:
        """`(version, weights_ref)` of the newest publish, or None before the first."""
        with self._lock:
            if self._ref is None:
                return None
            return self._version, self._ref

    def stats(self) -> dict[str, int]:
        """`{"version": ..., "published": ...}` for status displays."""
        with self._lock:
            return {"version": self._version, "published": self._published}


def put_weights(version: int, weights: dict[str, np.ndarray]) -> list[Any]:
    """Put `(version, weights)` into the object store once; returns `[ObjectRef]`, ready for
    `WeightStore.publish(version, ...)` (the list keeps Ray from resolving the reference)."""
    import ray

    return [ray.put((int(version), weights))]


def fetch_weights(
    store_handle: Any, have_version: int, *, timeout: float = FETCH_TIMEOUT_S
) -> tuple[int, dict[str, np.ndarray]] | None:
    """The store's newest `(version, weights)` when it is newer than `have_version`, else None.

    `store_handle` is the Ray actor handle of a `WeightStore`. One cheap `version()` call when
    nothing is new; otherwise one `latest()` call plus the weights' transfer. The returned arrays
    may be read-only views of shared memory: copy them into a module with
    `learner.policy.load_numpy_state_dict`, do not write to them.
    """
    import ray

    version = ray.get(store_handle.version.remote(), timeout=timeout)
    if version <= have_version:
        return None
    latest = ray.get(store_handle.latest.remote(), timeout=timeout)
    if latest is None:
        return None
    _, refs = latest
    fetched_version, weights = ray.get(refs[0], timeout=timeout)
    if fetched_version <= have_version:
        return None
    return fetched_version, weights


def publisher(store_handle: Any):
    """A `publish(version, weights)` callable for `Learner`: put once, hand the ref over.

    The remote call is not waited on (the learner must not block on actors); the pending call
    keeps the reference alive until the store holds it.
    """

    def publish(version: int, weights: dict[str, np.ndarray]) -> None:
        store_handle.publish.remote(version, put_weights(version, weights))

    return publish
