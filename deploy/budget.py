"""The env-step budget (`run.max_env_steps`), handed to the rollout actors in grants.

A run must stop within one fragment per actor of its budget, however fast the actors are and
however seldom the driver polls. So the budget is not checked after the fact: each actor may
only collect while its own env-step counter is below a limit the driver gave it
(`RolloutActor.set_step_limit`), and the driver's `StepBudget` keeps the ledger:

    free = budget - steps of the actors gone (and of a resumed run) - sum of the live limits

Grants come out of `free`, so the limits of the live actors plus what the others did never
exceed the budget; an actor that reached its limit finishes the fragment in progress and waits.
The run therefore ends with at most `budget + one fragment per actor` steps, and at least the
budget once every running actor is at its limit and nothing is free. An actor starts with limit
0 and gets its first grant at the first poll that hears from it; an actor that leaves (retired,
restarted) frees its unused allowance.

Grants keep each running actor `LEAD_S` seconds of its own progress ahead of its counter (so it
never idles while the budget lasts), and far from the end they hand out a quarter of what is
free per actor, so an actor is topped up a few dozen times per run, not at every poll.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class _Account:
    limit: int = 0
    steps: int = 0  # the actor's counter at its last report
    at: float | None = None  # when that report came (monotonic seconds)
    rate: float = 0.0  # env steps per second, smoothed over reports


#: Seconds of an actor's own progress its limit is kept ahead of its counter (at least 4 polls;
#: see `StepBudget.grants`).
LEAD_S = 1.0
#: Weight of the newest rate measurement in an actor's smoothed rate.
RATE_WEIGHT = 0.5


class StepBudget:
    """The ledger of one run's env-step budget over its live actors; see the module docstring."""

    def __init__(self, budget: int, fragment_steps: int):
        self.budget = budget
        self._fragment = fragment_steps  # env steps of one fragment (num_envs x unroll_length)
        self._accounts: dict[int, _Account] = {}

    def free(self, steps_gone: int) -> int:
        """Steps not granted to anyone; `steps_gone`: the actors gone and a resumed run's."""
        return self.budget - steps_gone - sum(a.limit for a in self._accounts.values())

    def limit(self, actor_id: int) -> int:
        account = self._accounts.get(actor_id)
        return account.limit if account is not None else 0

    def forget(self, actor_id: int) -> None:
        """An actor left (its counts moved to the steps gone): its unused allowance is free."""
        self._accounts.pop(actor_id, None)

    def exhausted(self, steps_gone: int) -> bool:
        """Nothing is free and every actor heard from has reached its limit."""
        return self.free(steps_gone) <= 0 and all(
            a.steps >= a.limit for a in self._accounts.values() if a.at is not None
        )

    def grants(
        self, reports: dict[int, int], steps_gone: int, now: float, poll_s: float
    ) -> dict[int, int]:
        """New limits `{actor_id: limit}` for the actors that need more room, given this poll's
        `reports` (`{actor_id: its env-step counter}` of the actors that answered) and the
        driver's poll interval `poll_s`. Limits only grow."""
        lead_s = max(LEAD_S, 4 * poll_s)
        wants: dict[int, int] = {}
        for actor_id, steps in reports.items():
            account = self._accounts.setdefault(actor_id, _Account())
            self._observe(account, steps, now)
            lead = max(int(account.rate * lead_s), 2 * self._fragment)
            if account.limit - steps < lead:
                wants[actor_id] = 2 * lead - (account.limit - steps)
        free = self.free(steps_gone)
        if not wants or free <= 0:
            return {}
        share = free // (4 * len(self._accounts))
        wants = {i: max(want, share) for i, want in wants.items()}
        total = sum(wants.values())
        if total > free:  # the end of the budget: split what is left by need
            wants = {i: free * want // total for i, want in wants.items()}
            first = next(iter(wants))
            wants[first] += free - sum(wants.values())
        out = {}
        for actor_id, grant in wants.items():
            if grant > 0:
                self._accounts[actor_id].limit += grant
                out[actor_id] = self._accounts[actor_id].limit
        return out

    @staticmethod
    def _observe(account: _Account, steps: int, now: float) -> None:
        if account.at is not None and now > account.at and steps >= account.steps:
            rate = (steps - account.steps) / (now - account.at)
            account.rate = RATE_WEIGHT * rate + (1 - RATE_WEIGHT) * account.rate
        account.steps, account.at = steps, now
