"""A cheap environment with Atari-shaped observations, for benchmarks of the data path.

`make_env(frame_stack=4, size=84, mean_episode=400, seed=0)` (an `env.id` of
`benchmarks.atari_like:make_env`) returns a Gymnasium env whose observations are `frame_stack`
stacked `uint8 [size, size]` frames, as `ALE/...` ids give them (Gymnasium's
`FrameStackObservation`, so a reset fills the stack as that wrapper does). Frames are random
bytes (nothing compresses them), a new one per step, drawn from a bank made once per env, so a
step costs little more than a copy. Episodes end after a random length (geometric, mean
`mean_episode` steps), so resets happen inside fragments. Six discrete actions, reward +-1 at
random.
"""

from __future__ import annotations

from typing import ClassVar

import gymnasium as gym
import numpy as np

#: Distinct frames per env; a step shows the next one (with a random start after a reset).
BANK = 64


class AtariLike(gym.Env):
    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(self, size: int = 84, mean_episode: int = 400, seed: int = 0):
        self.observation_space = gym.spaces.Box(0, 255, (size, size), np.uint8)
        self.action_space = gym.spaces.Discrete(6)
        self._bank = np.random.default_rng(seed).integers(0, 256, (BANK, size, size), np.uint8)
        self._end_p = 1.0 / mean_episode
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = int(self.np_random.integers(BANK))
        return self._bank[self._t % BANK].copy(), {}

    def step(self, action):
        self._t += 1
        reward = float(self.np_random.choice((-1.0, 0.0, 0.0, 0.0, 1.0)))
        terminated = bool(self.np_random.random() < self._end_p)
        return self._bank[self._t % BANK].copy(), reward, terminated, False, {}


def make_env(frame_stack: int = 4, size: int = 84, mean_episode: int = 400, seed: int = 0):
    env = AtariLike(size=size, mean_episode=mean_episode, seed=seed)
    return gym.wrappers.FrameStackObservation(env, frame_stack) if frame_stack > 1 else env
