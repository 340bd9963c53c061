"""Partially observed tasks: memory tasks that a feed-forward policy cannot solve.

`offpg/CartPoleNoVel-v1` (registered by `actors.envs`) is CartPole-v1 with the cart's velocity
and the pole's angular velocity removed from the observation: the policy sees `(x, theta)` only,
and must infer the velocities from how they change, so it needs memory (a recurrent core, or
stacked observations). Dynamics, reward (1 per step), termination and the 500-step time limit
are CartPole-v1's. Like CartPole it has a native vector env (all copies in one numpy call).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.envs.classic_control.cartpole import CartPoleEnv, CartPoleVectorEnv
from gymnasium.vector.utils import batch_space

#: The Gymnasium id under which `actors.envs` registers the task.
CARTPOLE_NOVEL_ID = "offpg/CartPoleNoVel-v1"
#: Indices of CartPole's `(x, x_dot, theta, theta_dot)` that stay observed.
KEEP = np.array([0, 2])


def _observed(space: spaces.Box) -> spaces.Box:
    return spaces.Box(space.low[KEEP], space.high[KEEP], dtype=np.float32)


class CartPoleNoVelEnv(CartPoleEnv):
    """CartPole observing `(x, theta)`: the two velocities are hidden."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.observation_space = _observed(self.observation_space)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        return obs[KEEP], reward, terminated, truncated, info

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = super().reset(**kwargs)
        return obs[KEEP], info


class CartPoleNoVelVectorEnv(CartPoleVectorEnv):
    """The vector form of `CartPoleNoVelEnv` (next-step autoreset, as CartPole's)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.single_observation_space = _observed(self.single_observation_space)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        obs, reward, terminated, truncated, info = super().step(actions)
        return obs[:, KEEP], reward, terminated, truncated, info

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = super().reset(**kwargs)
        return obs[:, KEEP], info
