"""Policy-gradient weights and V-trace targets: pure functions on time-major `[T, B]` tensors
(the straight-through Gumbel-softmax sample, which carries a gradient, is `learner/gumbel.py`).

Every function here takes torch tensors laid out time-major, `[T, B]` for per-step quantities
and `[B]` for per-column ones (the bootstrap value), on CPU or CUDA, in float32 or float64 (all
inputs of one call share dtype and device). Nothing is modified in place, hyperparameters are
keyword-only, and bad input raises `ValueError` naming the offending argument. The weight and
target functions return detached results (no gradient flows out) and see only log-probabilities
of the sampled actions, never logits, so any action distribution works.

Conventions, shared by the whole learner:

- `discounts[t, b] = gamma * (1 - done[t, b])`: a 0 marks the last step of an episode, and
  nothing after it is credited to steps before it. A time-limited (truncated) episode that ends
  inside a column can be bootstrapped by folding `gamma * V(s_final)` into its last reward and
  still giving that step discount 0; only the column's last step bootstraps from
  `bootstrap_value`.
- Within a column, an *episode segment* is a run of steps that ends at a 0 discount or at the
  column's end. Importance-weight products restart at each segment's first step.
- `rho[t, b] = exp(target_logp - behaviour_logp) = pi(a_t | s_t) / mu(a_t | s_t)`, where `pi` is
  the policy being trained and `mu` the (possibly stale) policy that acted.
- A weight tensor `w` from `pg_weights` defines the gradient estimate
  `(1/B) * sum_b sum_t w[t, b] * grad log pi(a_tb | s_tb)`, the gradient of the surrogate loss
  `-(w * target_logp).sum(0).mean()` (the learner divides by the number of real steps instead
  of B; see `learner/loss.py`).

Which of the estimators are unbiased, and the variance each buys, is shown on an exactly
solvable MDP in `tests/test_estimators_statistical.py`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from learner.columns import FLOAT_DTYPES, Segments, check_clip, check_tensors, check_values, scan
from learner.config import PG_ESTIMATORS

__all__ = [
    "ESTIMATORS",
    "VTraceReturns",
    "discounted_returns",
    "optimal_baseline",
    "pg_weights",
    "vtrace",
]

#: The valid values of `pg_weights(..., estimator=...)`.
ESTIMATORS = PG_ESTIMATORS
#: Estimators that correct for the behaviour policy and so need both log-probabilities.
_OFF_POLICY = frozenset({"trajectory_is", "per_decision_is", "reduced_is", "first_order_is"})
#: Estimators whose return is the whole segment's return `R` rather than the reward-to-go `Q`.
_SEGMENT_RETURN = frozenset({"reinforce", "trajectory_is"})


class VTraceReturns(NamedTuple):
    """The V-trace targets of one batch (IMPALA, Espeholt et al. 2018, lambda = 1).

    Attributes:
      vs: float `[T, B]`, the V-trace value targets `v_s`; regress `V(s_t)` towards them.
      pg_advantages: float `[T, B]`, the advantages for the policy gradient,
        `min(pg_rho_clip, rho_t) * (r_t + discounts_t * vs_{t+1} - V(s_t))`; use them as the
        weights `w` of the surrogate loss `-(w * target_logp).sum(0).mean()`.
    """

    vs: torch.Tensor
    pg_advantages: torch.Tensor


# --------------------------------------------------------------------------------------------
# Validation. Shapes, dtypes and devices are checked on the host for free; all value checks of
# one call (NaN/inf, ranges) are reduced on the device and read back with a single sync.


# --------------------------------------------------------------------------------------------
# Public API.


@torch.no_grad()
def discounted_returns(
    rewards: torch.Tensor, discounts: torch.Tensor, bootstrap_value: torch.Tensor
) -> torch.Tensor:
    """Discounted returns `G_t = r_t + discounts_t * G_{t+1}`, with `G_T = bootstrap_value`.

    Args:
      rewards: float32/float64 `[T, B]`, the reward `r_t` of each step.
      discounts: float32/float64 `[T, B]`, in [0, 1]: `gamma * (1 - done_t)`; a 0 ends the
        episode at step t, so nothing after it flows back.
      bootstrap_value: float32/float64 `[B]`, the value estimate `V(s_T)` of the state after
        each column's last step (only used where that step's discount is non-zero).

    Returns:
      float `[T, B]`, the returns `G_t`, same dtype and device as `rewards`.

    Raises:
      ValueError: on a shape, rank, dtype or device mismatch, on NaN/inf, or on discounts
        outside [0, 1]; the message names the argument.
    """
    check_tensors(
        {"rewards": rewards, "discounts": discounts}, {"bootstrap_value": bootstrap_value}
    )
    check_values(
        {"rewards": rewards, "discounts": discounts, "bootstrap_value": bootstrap_value},
        discounts,
    )
    return scan(rewards, discounts, bootstrap_value, reverse=True)


def _check_pg_args(
    rewards,
    discounts,
    bootstrap_value,
    target_logp,
    behaviour_logp,
    *,
    estimator,
    baseline,
    rho_clip,
) -> torch.Tensor | None:
    """The argument checks of `pg_weights`; returns the baseline when it is a `[T, B]` tensor."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
    if estimator in _OFF_POLICY:
        for name, x in (("target_logp", target_logp), ("behaviour_logp", behaviour_logp)):
            if x is None:
                raise ValueError(f"{name} is required by estimator {estimator!r}")
    check_clip("rho_clip", rho_clip)
    if isinstance(baseline, str) and baseline != "mean":
        raise ValueError(f"baseline must be None, 'mean' or a [T, B] tensor; got {baseline!r}")
    state_baseline = baseline if isinstance(baseline, torch.Tensor) else None
    if baseline is not None and state_baseline is None and not isinstance(baseline, str):
        raise ValueError(
            f"baseline must be None, 'mean' or a [T, B] tensor; got {type(baseline).__name__}"
        )
    steps = {
        "rewards": rewards,
        "discounts": discounts,
        "baseline": state_baseline,
        "target_logp": target_logp,
        "behaviour_logp": behaviour_logp,
    }
    check_tensors(steps, {"bootstrap_value": bootstrap_value})
    check_values(
        {**steps, "bootstrap_value": bootstrap_value},
        discounts,
    )
    return state_baseline


@torch.no_grad()
def pg_weights(
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    bootstrap_value: torch.Tensor,
    *,
    estimator: str,
    baseline: str | torch.Tensor | None = None,
    target_logp: torch.Tensor | None = None,
    behaviour_logp: torch.Tensor | None = None,
    rho_clip: float | None = None,
) -> torch.Tensor:
    """Per-step weights `w` of a policy-gradient estimator (see the module docstring for `w`).

    With `Q = discounted_returns(rewards, discounts, bootstrap_value)`, `R_t` = `Q` at the first
    step of t's episode segment (the whole segment's return, bootstrapped when the segment runs
    to the column's end), `b_t` the baseline, and `P_t = prod_{k = s}^{t} rho_k` the importance
    ratio from t's segment start `s` to t:

    ==================  ==================================================================
    estimator           w_t
    ==================  ==================================================================
    reinforce           `R_t - b_t` (whole-trajectory return; unbiased on-policy)
    reward_to_go        `Q_t - b_t` (causality; unbiased on-policy, lower variance)
    trajectory_is       `P_e * (R_t - b_t)`, e = the segment's last step (unbiased)
    per_decision_is     `sum_{t' >= t in segment} (prod_{k=t}^{t'-1} discounts_k) * P_t' *
                        r_t'` + the bootstrap term weighted the same way when the segment
                        runs to the column's end, `- P_t * b_t` (unbiased, causal)
    reduced_is          `P_t * (Q_t - b_t)` (the seed's reduced expression; biased)
    first_order_is      `rho_t * (Q_t - b_t)` (the seed's first-order form; biased)
    ==================  ==================================================================

    "Unbiased" holds with `rho_clip=None`; `reinforce` and `reward_to_go` are unbiased only for
    on-policy data. A constant baseline must not depend on the sample for the estimator to stay
    unbiased: `"mean"` does (it includes the column's own return), which biases by O(1/B).

    Args:
      rewards: float32/float64 `[T, B]`, the reward `r_t` of each step.
      discounts: float32/float64 `[T, B]`, in [0, 1]: `gamma * (1 - done_t)`; a 0 ends the
        episode segment at step t.
      bootstrap_value: float32/float64 `[B]`, `V(s_T)` for the state after each column's last
        step; it enters the return of a segment that reaches the column's end unterminated.
      estimator: one of `ESTIMATORS` (keyword-only).
      baseline: `None` (b = 0); `"mean"` (b_t = the mean over the B columns of the return the
        estimator uses at step t: `R_t` for `reinforce` and `trajectory_is`, `Q_t` otherwise);
        or a float32/float64 `[T, B]` tensor of state-dependent values `b(s_t)`.
      target_logp: float32/float64 `[T, B]`, `log pi(a_t | s_t)` under the policy being
        trained. Required by the importance-sampling estimators; checked but unused by
        `reinforce` and `reward_to_go`.
      behaviour_logp: float32/float64 `[T, B]`, `log mu(a_t | s_t)` under the policy that
        acted. Required and used like `target_logp`.
      rho_clip: `None` or a positive float: truncate every per-step ratio at this value,
        `rho_t -> min(rho_t, rho_clip)`, before it enters any product (for `first_order_is`
        this is the issue's truncated weight; for the product estimators it trades their
        unbiasedness for bounded variance). Ignored by the on-policy estimators.

    Returns:
      float `[T, B]`, the weights `w`, same dtype and device as `rewards`, detached.

    Raises:
      ValueError: for an unknown estimator (the valid ones are listed), a missing log-prob an
        estimator needs, a bad baseline or clip, a shape, rank, dtype or device mismatch,
        NaN/inf in any input, or discounts outside [0, 1]; the message names the argument.
    """
    state_baseline = _check_pg_args(
        rewards,
        discounts,
        bootstrap_value,
        target_logp,
        behaviour_logp,
        estimator=estimator,
        baseline=baseline,
        rho_clip=rho_clip,
    )
    off_policy = estimator in _OFF_POLICY

    q = scan(rewards, discounts, bootstrap_value, reverse=True)
    segments = Segments(discounts)
    ret = segments.fill_from_start(q) if estimator in _SEGMENT_RETURN else q
    if baseline is None:
        b = torch.zeros((), dtype=q.dtype, device=q.device)
    elif state_baseline is None:  # "mean"
        b = ret.mean(dim=1, keepdim=True)
    else:
        b = state_baseline

    if not off_policy:
        return ret - b

    log_rho = target_logp - behaviour_logp
    if rho_clip is not None:
        log_rho = log_rho.clamp(max=math.log(rho_clip))
    rho = log_rho.exp()
    if estimator == "first_order_is":
        return rho * (ret - b)
    prod = segments.running_product(rho)
    if estimator == "trajectory_is":
        return segments.fill_from_end(prod) * (ret - b)
    if estimator == "reduced_is":
        return prod * (ret - b)
    # per_decision_is: each reward carries the ratio product up to its own step, so the
    # reward-to-go of P * r (bootstrapped with the last segment's full product) is the sum.
    weighted = scan(prod * rewards, discounts, prod[-1] * bootstrap_value, reverse=True)
    return weighted - prod * b


@torch.no_grad()
def vtrace(
    behaviour_logp: torch.Tensor,
    target_logp: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    discounts: torch.Tensor,
    *,
    rho_clip: float | None = 1.0,
    c_clip: float | None = 1.0,
    pg_rho_clip: float | None = 1.0,
    lambda_: float = 1.0,
) -> VTraceReturns:
    """V-trace targets and policy-gradient advantages (IMPALA, Espeholt et al. 2018).

    With `rho_t = exp(target_logp_t - behaviour_logp_t)`, `V_t = values_t`, `V_T =
    bootstrap_value`::

      delta_t         = min(rho_clip, rho_t) * (r_t + discounts_t * V_{t+1} - V_t)
      vs_t - V_t      = delta_t + discounts_t * lambda_ * min(c_clip, rho_t) * (vs_{t+1} - V_{t+1})
      pg_advantages_t = min(pg_rho_clip, rho_t) * (r_t + discounts_t * vs_{t+1} - V_t),
                        with vs_T = bootstrap_value

    On-policy (rho = 1) with clips >= 1, `vs` is the n-step bootstrapped return
    `discounted_returns(rewards, discounts, bootstrap_value)`.

    Args:
      behaviour_logp: float32/float64 `[T, B]`, `log mu(a_t | s_t)` under the acting policy.
      target_logp: float32/float64 `[T, B]`, `log pi(a_t | s_t)` under the policy being trained.
      rewards: float32/float64 `[T, B]`, the reward `r_t` of each step.
      values: float32/float64 `[T, B]`, the learner's value estimates `V(s_t)`.
      bootstrap_value: float32/float64 `[B]`, `V(s_T)` for the state after each column's last
        step.
      discounts: float32/float64 `[T, B]`, in [0, 1]: `gamma * (1 - done_t)`.
      rho_clip: the truncation `rho_bar` of the importance weights in `delta_t`; a positive
        float, or None for no truncation.
      c_clip: the truncation `c_bar` of the trace coefficients; positive float or None.
      pg_rho_clip: the truncation of the importance weights in `pg_advantages`; positive float
        or None.
      lambda_: float in [0, 1], the paper's remark-1 trace weight (`c_t = lambda *
        min(c_clip, rho_t)`): 1 is the paper's default, 0 gives one-step TD targets; lower
        values trade bias for variance like GAE's lambda.

    Returns:
      `VTraceReturns(vs, pg_advantages)`, both float `[T, B]` like `rewards`, detached.

    Raises:
      ValueError: on a bad clip, a shape, rank, dtype or device mismatch, NaN/inf in any input,
        or discounts outside [0, 1]; the message names the argument.
    """
    for name, clip in (("rho_clip", rho_clip), ("c_clip", c_clip), ("pg_rho_clip", pg_rho_clip)):
        check_clip(name, clip)
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ must lie in [0, 1], got {lambda_!r}")
    steps = {
        "behaviour_logp": behaviour_logp,
        "target_logp": target_logp,
        "rewards": rewards,
        "values": values,
        "discounts": discounts,
    }
    check_tensors(steps, {"bootstrap_value": bootstrap_value})
    check_values(
        {**steps, "bootstrap_value": bootstrap_value},
        discounts,
    )

    log_rho = target_logp - behaviour_logp

    def clipped(clip: float | None) -> torch.Tensor:
        # Clip in log space: exp(min(log rho, log c)) == min(rho, c), without overflowing first.
        return (log_rho if clip is None else log_rho.clamp(max=math.log(clip))).exp()

    rhos, cs, pg_rhos = clipped(rho_clip), lambda_ * clipped(c_clip), clipped(pg_rho_clip)
    values_next = torch.cat([values[1:], bootstrap_value.unsqueeze(0)])
    deltas = rhos * (rewards + discounts * values_next - values)
    vs = values + scan(deltas, discounts * cs, torch.zeros_like(bootstrap_value), reverse=True)
    vs_next = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)])
    pg_advantages = pg_rhos * (rewards + discounts * vs_next - values)
    return VTraceReturns(vs=vs, pg_advantages=pg_advantages)


@torch.no_grad()
def optimal_baseline(returns: torch.Tensor, grad_sq_norms: torch.Tensor) -> torch.Tensor:
    """The variance-minimising constant baseline `b* = sum(g^2 * R) / sum(g^2)`.

    From the seed's ANOVA of `g(tau) * (R(tau) - b)`: the expected return weighted by the squared
    norm of each trajectory's score `g = sum_t grad log pi(a_t | s_t)`. Weights that are not
    uniform (e.g. exact trajectory probabilities) can be folded into `grad_sq_norms`.

    Args:
      returns: float32/float64 `[N]`, the return `R` of each of N trajectories.
      grad_sq_norms: float32/float64 `[N]`, `||g||^2 >= 0` of each trajectory; not all zero.

    Returns:
      float 0-dim tensor, `b*`, same dtype and device as `returns`, detached.

    Raises:
      ValueError: on a shape, rank, dtype or device mismatch, NaN/inf, negative
        `grad_sq_norms`, or `grad_sq_norms` summing to 0; the message names the argument.
    """
    for name, x in (("returns", returns), ("grad_sq_norms", grad_sq_norms)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
        if x.dim() != 1 or x.numel() == 0:
            raise ValueError(f"{name} must be a non-empty [N] tensor, got {tuple(x.shape)}")
    if grad_sq_norms.shape != returns.shape:
        raise ValueError(
            f"grad_sq_norms has shape {tuple(grad_sq_norms.shape)} but returns has "
            f"{tuple(returns.shape)}"
        )
    if grad_sq_norms.dtype != returns.dtype or grad_sq_norms.device != returns.device:
        raise ValueError("grad_sq_norms must have the dtype and device of returns")
    check_values({"returns": returns, "grad_sq_norms": grad_sq_norms})
    total = grad_sq_norms.sum()
    lowest, total_value = torch.stack([grad_sq_norms.amin(), total]).tolist()
    if lowest < 0:
        raise ValueError(f"grad_sq_norms must be >= 0, found {lowest}")
    if total_value <= 0:
        raise ValueError("grad_sq_norms must not all be 0")
    return (grad_sq_norms * returns).sum() / total
