"""The recurrent core of a policy network: an LSTM between the torso and the heads.

The state of N streams (envs, or batch columns) is one tensor `[2, N, size]`, `h` stacked on
`c`: the layout of the trajectory schema's `core_state` (`replay.trajectory`), so a fragment's
stored state goes into the network as it is.

Two entry points that compute the same thing:

- `step(x, state)`: one step of N streams, the rollout actor's act path;
- `unroll(x, state, resets)`: `T + 1` steps of B streams from a stored state, the learner's path.
  Before row t it zeroes the state of the columns where `resets[t]`, exactly as the actor
  zeroed them before acting (`episode_starts` says where, from the schema's `autoreset`).

The cell is one `nn.LSTMCell` for both, so an unroll equals the actor's steps up to
floating-point reassociation of batched matrix products.
"""

from __future__ import annotations

import torch
from torch import nn


def episode_starts(autoreset: torch.Tensor) -> torch.Tensor:
    """Rows of a `[T+1, B]` unroll whose entering core state is zeroed, from `autoreset [T, B]`
    (bool).

    Row t >= 1 starts an episode where step t - 1 was an autoreset step: Gymnasium's next-step
    autoreset makes that step return the new episode's first observation, `obs[t]`. The
    autoreset step itself keeps the ending episode's state (it acts on that episode's real
    final observation, whose value a truncated step bootstraps from). Row 0 never resets: a
    fragment stores its core state after the actor's reset.
    """
    return torch.cat([torch.zeros_like(autoreset[:1]), autoreset])


class LSTMCore(nn.Module):
    """An LSTM cell from `in_features` to `size`; its state is `[2, N, size]` (h, c)."""

    def __init__(self, in_features: int, size: int):
        super().__init__()
        self.size = size
        self.cell = nn.LSTMCell(in_features, size)
        # Orthogonal weights and zero biases, as CleanRL's recurrent PPO initialises its LSTM.
        for name, param in self.cell.named_parameters():
            if name.startswith("weight"):
                nn.init.orthogonal_(param, 1.0)
            else:
                nn.init.zeros_(param)

    def initial_state(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """The zero state of `n` streams, `[2, n, size]` float32."""
        return torch.zeros(2, n, self.size, device=device)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: `x [N, in_features]`, `state [2, N, size]` -> `(output [N, size],
        next state [2, N, size])`; the output is the new `h`."""
        self._check_state(state, x.shape[0])
        h, c = self.cell(x, (state[0], state[1]))
        return h, torch.stack((h, c))

    def unroll(
        self, x: torch.Tensor, state: torch.Tensor, resets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`x [T+1, B, in_features]` from `state [2, B, size]`, zeroing the state entering row t
        where `resets[t]` (`[T+1, B]` bool) -> `(outputs [T+1, B, size], final state [2, B,
        size])`, with gradients through every step."""
        t1, b = x.shape[:2]
        self._check_state(state, b)
        if tuple(resets.shape) != (t1, b):
            raise ValueError(
                f"resets has shape {tuple(resets.shape)}, expected [T+1, B] = ({t1}, {b})"
            )
        keep = (~resets).to(x.dtype).unsqueeze(-1)
        h, c = state[0], state[1]
        outputs = []
        for t in range(t1):
            h, c = self.cell(x[t], (h * keep[t], c * keep[t]))
            outputs.append(h)
        return torch.stack(outputs), torch.stack((h, c))

    def _check_state(self, state: torch.Tensor, n: int) -> None:
        if tuple(state.shape) != (2, n, self.size):
            raise ValueError(
                f"core state has shape {tuple(state.shape)}, expected [2, N, core_size] = "
                f"(2, {n}, {self.size})"
            )
