"""The Ray actor classes of a job, one module per kind of process.

Ray imports an actor's class from its module in the actor's own worker process, so each module
here imports only what its process needs: `replay` (the replay service) neither torch nor
Gymnasium, `learner` torch, `rollout` torch and Gymnasium. The weight store
(`learner.broadcast.WeightStore`) and the run's controller (`deploy.controller.Controller`) are
plain classes that need neither. `deploy.topology` gives each its resources and placement;
`tests/test_startup.py` checks which processes import torch.
"""

from __future__ import annotations

import warnings

import ray

#: Seconds any driver-side Ray call may block before it is reported as stuck.
CALL_TIMEOUT = 60.0


def was_restarted() -> bool:
    """Whether Ray restarted the current actor (its process died and this is a new one)."""
    # Ray 2.60's property reads its own deprecated `actor_id` inside: silence that warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
