"""A tiny scripted environment with known returns, for the actor tests.

Observation `[k, seed, last_action]`: `k` is the number of steps taken in the current episode
(0 right after a reset), `seed` the seed of the env's last seeded reset, `last_action` the
(first component of the) action the env received. The reward of the k-th step is `k`, so an
episode of length L returns L (L + 1) / 2. Actions do not change anything else.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

#: Registered id: never terminates, truncated by a TimeLimit after 3 steps (Gymnasium id path).
TRUNCATED_ID = "offpg-test/ScriptedTimeLimit-v0"
#: User-callable id (`package.module:callable` path).
CALLABLE_ID = "scripted_env:ScriptedEnv"


class ScriptedEnv(gym.Env):
    """Terminates after `length` steps (plus `seed % 3` when `vary_length`); None: never.
    Each step sleeps `step_delay_s` (a slow simulator)."""

    #: Test hooks, shared by all instances: the next this-many `step` calls raise RuntimeError,
    #: `reset` calls raise RuntimeError, `step` calls return a NaN reward.
    failures_left = 0
    reset_failures_left = 0
    nan_rewards_left = 0

    def __init__(
        self,
        length: int | None = 3,
        vary_length: bool = False,
        continuous: bool = False,
        step_delay_s: float = 0.0,
    ) -> None:
        self.length = length
        self.step_delay_s = step_delay_s
        self.vary_length = vary_length
        self.observation_space = spaces.Box(-np.inf, np.inf, (3,), np.float32)
        if continuous:
            self.action_space: spaces.Space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        else:
            self.action_space = spaces.Discrete(2)
        self._seed = -1
        self._k = 0
        self._last = 0.0

    @property
    def episode_length(self) -> int | None:
        if self.length is None:
            return None
        return self.length + (self._seed % 3 if self.vary_length else 0)

    def _obs(self) -> np.ndarray:
        return np.array([self._k, self._seed, self._last], np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if ScriptedEnv.reset_failures_left > 0:
            ScriptedEnv.reset_failures_left -= 1
            raise RuntimeError("scripted env reset failure")
        super().reset(seed=seed)
        if seed is not None:
            self._seed = seed
        self._k = 0
        self._last = 0.0
        return self._obs(), {}

    def step(self, action):
        if ScriptedEnv.failures_left > 0:
            ScriptedEnv.failures_left -= 1
            raise RuntimeError("scripted env failure")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self._k += 1
        self._last = float(np.asarray(action).reshape(-1)[0])
        length = self.episode_length
        terminated = length is not None and self._k >= length
        reward = float(self._k)
        if ScriptedEnv.nan_rewards_left > 0:
            ScriptedEnv.nan_rewards_left -= 1
            reward = float("nan")
        return self._obs(), reward, terminated, False, {}


if TRUNCATED_ID not in gym.registry:
    gym.register(
        TRUNCATED_ID, entry_point=ScriptedEnv, max_episode_steps=3, kwargs={"length": None}
    )


def reference_stream(lengths: list[int], steps: int) -> dict[str, np.ndarray]:
    """What `steps` steps of envs with these episode lengths must produce, written as a plain
    per-env, per-step loop: `k` (obs[:, :, 0], `steps + 1` rows), rewards, ends, autoreset."""
    n = len(lengths)
    k = np.zeros((steps + 1, n))
    rewards = np.zeros((steps, n))
    ended = np.zeros((steps, n), bool)
    autoreset = np.zeros((steps, n), bool)
    for i, length in enumerate(lengths):
        step_in_episode, prev_done = 0, False
        for t in range(steps):
            if prev_done:  # next-step autoreset: reward 0, first obs of the new episode
                autoreset[t, i] = True
                step_in_episode, prev_done = 0, False
            else:
                step_in_episode += 1
                rewards[t, i] = step_in_episode
                prev_done = ended[t, i] = step_in_episode == length
            k[t + 1, i] = step_in_episode
    return {"k": k, "rewards": rewards, "ended": ended, "autoreset": autoreset}
