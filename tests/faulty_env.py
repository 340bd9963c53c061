"""CartPole that fails now and then, for the fault-injection tests (`faulty_env:make`).

Each `step` raises with probability `step_error`, each `reset` with probability `reset_error`,
and a reward is NaN with probability `nan_reward` (a fragment holding it is refused by the
codec). Draws come from a per-instance generator, so failures are spread over the run.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

#: The user-callable id (`package.module:callable`; `tests/` must be on the workers' path).
FAULTY_ID = "faulty_env:make"


class InjectedFailure(RuntimeError):
    """What the faulty env raises."""


class FaultyEnv(gym.Wrapper):
    def __init__(
        self, env: gym.Env, step_error: float, reset_error: float, nan_reward: float
    ) -> None:
        super().__init__(env)
        self._p_step, self._p_reset, self._p_nan = step_error, reset_error, nan_reward
        self._rng = np.random.default_rng()

    def reset(self, **kwargs: Any):
        if self._rng.random() < self._p_reset:
            raise InjectedFailure("injected failure in reset")
        return self.env.reset(**kwargs)

    def step(self, action: Any):
        if self._rng.random() < self._p_step:
            raise InjectedFailure("injected failure in step")
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._rng.random() < self._p_nan:
            reward = float("nan")
        return obs, reward, terminated, truncated, info


def make(step_error: float = 2e-5, reset_error: float = 1e-3, nan_reward: float = 2e-5) -> gym.Env:
    return FaultyEnv(gym.make("CartPole-v1"), step_error, reset_error, nan_reward)
