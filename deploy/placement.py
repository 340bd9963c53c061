"""The placement group of a job that runs inside one: a Tune trial (`deploy.tune`).

Tune starts each trial's driver in bundle 0 of the trial's placement group. Ray places the
children of such a driver in the same group only when they name no scheduling strategy of their
own; the replay shards (node affinity) and the rollout actors (SPREAD) do name one, and would
land outside it, taking CPUs another trial reserved. `deploy.topology` asks `in_job_group` for
each actor's bundle instead, so every trial's learner, replay shards and actors stay inside
the resources the trial holds, and trials sharing a cluster do not starve each other.
"""

from __future__ import annotations

from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

#: Bundles of a job's placement group: the driver; the learner, with the replay shards and
#: weight store next to it (they reserve no CPU); then one per rollout actor.
DRIVER_BUNDLE, LEARNER_BUNDLE, FIRST_ACTOR_BUNDLE = 0, 1, 2
#: CPUs the driver's bundle reserves: its loop mostly waits on the actors' answers.
DRIVER_CPUS = 0.5


def job_bundles(actor_cpus: float, num_actors: int, gpu: bool) -> list[dict[str, float]]:
    """The bundles of one job (see `DRIVER_BUNDLE`); `gpu`: the learner's holds one GPU."""
    return [
        {"CPU": DRIVER_CPUS},
        {"CPU": 1.0, **({"GPU": 1.0} if gpu else {})},
        *({"CPU": float(actor_cpus)} for _ in range(num_actors)),
    ]


def in_job_group(bundle: int) -> PlacementGroupSchedulingStrategy | None:
    """Bundle `bundle` (-1: any bundle with room) of the placement group this driver runs in;
    None when it runs in none (a plain `offpg train`: the caller's own strategy applies)."""
    group = get_current_placement_group()
    if group is None:
        return None
    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
