"""The Ray actor classes of a job, one module per kind of process.

Ray imports an actor's class from its module in the actor's own worker process, so each module
here imports only what its process needs: `replay` (the replay service) neither torch nor
Gymnasium, `learner` torch, `rollout` torch and Gymnasium. The weight store
(`learner.broadcast.WeightStore`) and the run's controller (`deploy.controller.Controller`) are
plain classes that need neither. `deploy.topology` gives each its resources and placement;
`tests/test_startup.py` checks which processes import torch.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Any

import ray

log = logging.getLogger(__name__)

#: Seconds any driver-side Ray call may block before it is reported as stuck.
CALL_TIMEOUT = 60.0
#: Seconds between looks at a stop flag while waiting on a slow call (`wait_patiently`).
STOP_CHECK_S = 0.5


def was_restarted() -> bool:
    """Whether Ray restarted the current actor (its process died and this is a new one)."""
    # Ray 2.60's property reads its own deprecated `actor_id` inside: silence that warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def wait_patiently(ref: Any, what: str, stop: threading.Event | None = None) -> Any:
    """`ray.get(ref)` without a deadline that would fail the run: a call queued behind
    backpressure is slow, not lost (a dead actor raises, and Ray retries calls to restarted
    ones). Logs a warning every `CALL_TIMEOUT` s of waiting; returns None once `stop` is set."""
    start = warned = time.monotonic()
    while not ray.wait([ref], timeout=STOP_CHECK_S)[0]:
        if stop is not None and stop.is_set():
            return None
        if (now := time.monotonic()) - warned >= CALL_TIMEOUT:
            log.warning("%s not answered after %.0f s; still waiting", what, now - start)
            warned = now
    return ray.get(ref)
