"""The weight store: the newest published `(version, weights reference)`, nothing older.

The learner publishes its weights once per `publish_every` steps; rollout actors ask the store
for anything newer than the version they hold. The store never sees the weights themselves,
only a reference to them (`deploy/weights.py` puts them into Ray's object store and hands the
store `[ObjectRef]`), so one store serves any number of actors. `WeightStore` is a plain class;
`deploy/` wraps it with `ray.remote(...)`.
"""

from __future__ import annotations

import threading
from typing import Any


class WeightStore:
    """Holds the newest `(version, weights_ref)` and nothing older.

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

    def latest_if_newer(self, have: int) -> tuple[int, Any] | None:
        """`(version, weights_ref)` when the newest publish is newer than version `have`, else
        None: a consumer's whole check-and-get in one call."""
        with self._lock:
            if self._ref is None or self._version <= have:
                return None
            return self._version, self._ref

    def stats(self) -> dict[str, int]:
        """`{"version": ..., "published": ...}` for status displays."""
        with self._lock:
            return {"version": self._version, "published": self._published}
