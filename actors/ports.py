"""What a rollout actor talks to: where its fragments go (`FragmentSink`) and where its weights
come from (`WeightSource`), with the in-process implementations used by tests, benchmarks and
`deploy.inprocess` (`MemorySink`, `LocalWeights`). The Ray implementations are in `deploy/`.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class FragmentSink(Protocol):
    """Where encoded fragments go (in deploy/: the replay service, with bounded in-flight)."""

    def put(self, data: bytes) -> None:
        """Send one encoded fragment; may block to keep inserts in flight bounded."""

    def flush(self) -> None:
        """Block until every fragment put so far has been delivered (or failed)."""


@runtime_checkable
class WeightSource(Protocol):
    """Where the actor gets policy weights (in deploy/: the learner's WeightStore). A sync is
    this one call: the actor never asks for the version first."""

    def fetch(self, have_version: int) -> tuple[int, dict[str, np.ndarray]] | None:
        """`(version, numpy state dict)` of the newest weights if newer than `have_version`,
        else None (and then cheap: no weights move)."""


class MemorySink:
    """A `FragmentSink` keeping the bytes in a list: for tests and the in-process wiring
    (`deploy.inprocess`)."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.flushes = 0

    def put(self, data: bytes) -> None:
        self.items.append(data)

    def flush(self) -> None:
        self.flushes += 1


class LocalWeights:
    """An in-process `WeightSource`: `publish(weights)` bumps the version. Thread-safe."""

    def __init__(self, weights: dict[str, np.ndarray] | None = None) -> None:
        self._lock = threading.Lock()
        self._version = -1
        self._weights: dict[str, np.ndarray] | None = None
        if weights is not None:
            self.publish(weights)

    def publish(self, weights: dict[str, np.ndarray]) -> int:
        with self._lock:
            self._version += 1
            self._weights = weights
            return self._version

    def fetch(self, have_version: int) -> tuple[int, dict[str, np.ndarray]] | None:
        with self._lock:
            if self._weights is None or self._version <= have_version:
                return None
            return self._version, self._weights
