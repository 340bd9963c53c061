"""A tiny env with stacked uint8 frames and short episodes, for the frame-stack tests.

`make(frame_stack=4, padding="reset")` is Gymnasium's `FrameStackObservation` over `FrameEnv`,
whose 6x6 frames are unique per (seed, episode, step): frame[0, 0] is the step in the episode,
frame[0, 1] the episode number since the last seeded reset, frame[0, 2] the seed, the rest
noise from the env's generator. Episodes last 1 to 4 steps (drawn at reset), so episode resets,
and two resets closer together than the stack, happen inside short fragments.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

SIZE = 6


class FrameEnv(gym.Env):
    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(0, 255, (SIZE, SIZE), np.uint8)
        self.action_space = gym.spaces.Discrete(3)
        self._seed = 0
        self._episode = -1
        self._step = 0
        self._length = 1

    def _frame(self) -> np.ndarray:
        frame = self.np_random.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
        frame[0, :3] = (self._step, self._episode % 256, self._seed % 256)
        return frame

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._seed, self._episode = seed, -1
        self._episode += 1
        self._step = 0
        self._length = int(self.np_random.integers(1, 5))
        return self._frame(), {}

    def step(self, action):
        self._step += 1
        return self._frame(), float(action), self._step >= self._length, False, {}


def make(frame_stack: int = 4, padding: str = "reset") -> gym.Env:
    return gym.wrappers.FrameStackObservation(FrameEnv(), frame_stack, padding_type=padding)
