"""STGS: the straight-through Gumbel-softmax sample of a categorical policy, which carries a
gradient to its logits (the one estimator input that is not detached; see `learner/loss.py`
for the policy term built on it, and `learner/estimators.py` for the detached weights)."""

from __future__ import annotations

import math

import torch

from learner.columns import FLOAT_DTYPES, check_values


def straight_through_gumbel(
    logits: torch.Tensor, *, tau: float, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """A straight-through Gumbel-softmax sample of the categorical `softmax(logits)` (STGS).

    With Gumbel(0, 1) noise `g` (drawn here, or given as `noise`)::

      y_hard = one_hot(argmax(logits + g))          the forward value
      y_soft = softmax((logits + g) / tau)          whose gradient is the backward pass
      sample = y_hard - y_soft.detach() + y_soft

    The forward value is exactly one-hot (`(1 - s) + s` and `(0 - s) + s` round back to 1 and 0
    for any `s` in [0, 1]) and, by the Gumbel-max property, its argmax is distributed as
    `softmax(logits)`: the same draw the rollout actors make. The backward pass is that of the
    relaxed sample `y_soft` (Jang, Gu and Poole 2017), so `f(sample)` for a differentiable `f`,
    e.g. a critic `(q * sample).sum(-1)`, gives a pathwise, biased, low-variance gradient for
    the logits. Lower `tau` makes `y_soft` closer to `y_hard` (less bias) and its gradient
    larger and noisier; `argmax` itself carries no gradient.

    Args:
      logits: float32/float64 `[..., A]` (e.g. `[T, B, A]`), A >= 1 unnormalised
        log-probabilities, finite; the gradient flows back to them.
      tau: the temperature of the soft sample, a positive finite number (keyword-only).
      noise: optional float `[..., A]` Gumbel(0, 1) noise of `logits`' shape, dtype and device,
        finite (keyword-only); a test or a caller that needs reproducible draws passes it. By
        default it is drawn from torch's global generator as `-log(Exponential(1))`.

    Returns:
      float `[..., A]`, same shape, dtype and device as `logits`: one-hot in the forward pass,
      with the gradient of `y_soft` with respect to `logits`.

    Raises:
      ValueError: on a bad `tau`, a logits tensor that is not float or has no action dimension,
        a `noise` of another shape, dtype or device, or NaN/inf in either; the message names
        the argument.
    """
    if isinstance(tau, bool) or not isinstance(tau, int | float):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must be float32 or float64, got {logits.dtype}")
    if logits.dim() == 0 or logits.numel() == 0:
        raise ValueError(
            f"logits must be a non-empty [..., A] tensor with A >= 1, got {tuple(logits.shape)}"
        )
    if noise is None:
        with torch.no_grad():
            noise = -torch.empty_like(logits).exponential_().log()
    else:
        if not isinstance(noise, torch.Tensor):
            raise ValueError(f"noise must be a torch.Tensor or None, got {type(noise).__name__}")
        if noise.shape != logits.shape:
            raise ValueError(
                f"noise has shape {tuple(noise.shape)} but logits has {tuple(logits.shape)}"
            )
        if noise.dtype != logits.dtype or noise.device != logits.device:
            raise ValueError(
                f"noise is {noise.dtype} on {noise.device} but logits is {logits.dtype} on "
                f"{logits.device}; they must match"
            )
    check_values({"logits": logits.detach(), "noise": noise.detach()})
    perturbed = logits + noise.detach()
    y_soft = torch.softmax(perturbed / tau, dim=-1)
    index = perturbed.detach().argmax(dim=-1, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(-1, index, 1.0)
    return y_hard - y_soft.detach() + y_soft
