"""Slow references for `learner.estimators`, written like the formulas of issue 2.

Plain float64 NumPy with explicit loops over columns and time steps: no scans, no clever
products, nothing shared with the code under test. Arrays are time-major, `[T, B]` per step and
`[B]` for the bootstrap value. A clip of None means no clipping.
"""

from __future__ import annotations

import numpy as np


def _f64(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]


def discount_product(discounts, b, first, last):
    """`prod_{k=first}^{last} discounts[k, b]` (1 for an empty range)."""
    out = 1.0
    for k in range(first, last + 1):
        out *= discounts[k, b]
    return out


def segment_of(discounts, t, b):
    """The first and last step of the episode segment containing step t of column b."""
    T = discounts.shape[0]
    start = t
    while start > 0 and discounts[start - 1, b] != 0:
        start -= 1
    end = t
    while end < T - 1 and discounts[end, b] != 0:
        end += 1
    return start, end


def discounted_returns(rewards, discounts, bootstrap_value):
    """`G_t = sum_{t' >= t} (prod_{k=t}^{t'-1} d_k) r_t' + (prod_{k=t}^{T-1} d_k) * V_T`."""
    rewards, discounts, bootstrap_value = _f64(rewards, discounts, bootstrap_value)
    T, B = rewards.shape
    out = np.zeros((T, B))
    for b in range(B):
        for t in range(T):
            total = 0.0
            for t2 in range(t, T):
                total += discount_product(discounts, b, t, t2 - 1) * rewards[t2, b]
            total += discount_product(discounts, b, t, T - 1) * bootstrap_value[b]
            out[t, b] = total
    return out


def _rhos(target_logp, behaviour_logp, clip):
    rho = np.exp(target_logp - behaviour_logp)
    return rho if clip is None else np.minimum(rho, clip)


def pg_weights(
    rewards,
    discounts,
    bootstrap_value,
    *,
    estimator,
    baseline=None,
    target_logp=None,
    behaviour_logp=None,
    rho_clip=None,
):
    """The per-step weights of each estimator, one (t, b) at a time."""
    rewards, discounts, bootstrap_value = _f64(rewards, discounts, bootstrap_value)
    T, B = rewards.shape
    q = discounted_returns(rewards, discounts, bootstrap_value)
    seg_return = np.zeros((T, B))
    for b in range(B):
        for t in range(T):
            start, _ = segment_of(discounts, t, b)
            seg_return[t, b] = q[start, b]
    ret = seg_return if estimator in ("reinforce", "trajectory_is") else q
    if baseline is None:
        base = np.zeros((T, B))
    elif isinstance(baseline, str):
        assert baseline == "mean"
        base = np.zeros((T, B))
        for t in range(T):
            base[t, :] = sum(ret[t, b] for b in range(B)) / B
    else:
        (base,) = _f64(baseline)
    if estimator in ("reinforce", "reward_to_go"):
        return ret - base

    target_logp, behaviour_logp = _f64(target_logp, behaviour_logp)
    rho = _rhos(target_logp, behaviour_logp, rho_clip)

    def rho_product(b, first, last):
        out = 1.0
        for k in range(first, last + 1):
            out *= rho[k, b]
        return out

    w = np.zeros((T, B))
    for b in range(B):
        for t in range(T):
            start, end = segment_of(discounts, t, b)
            if estimator == "trajectory_is":
                w[t, b] = rho_product(b, start, end) * (ret[t, b] - base[t, b])
            elif estimator == "reduced_is":
                w[t, b] = rho_product(b, start, t) * (ret[t, b] - base[t, b])
            elif estimator == "first_order_is":
                w[t, b] = rho[t, b] * (ret[t, b] - base[t, b])
            elif estimator == "per_decision_is":
                total = 0.0
                for t2 in range(t, end + 1):
                    total += (
                        discount_product(discounts, b, t, t2 - 1)
                        * rho_product(b, start, t2)
                        * rewards[t2, b]
                    )
                if end == T - 1 and discounts[T - 1, b] != 0:
                    total += (
                        discount_product(discounts, b, t, T - 1)
                        * rho_product(b, start, T - 1)
                        * bootstrap_value[b]
                    )
                w[t, b] = total - rho_product(b, start, t) * base[t, b]
            else:
                raise ValueError(estimator)
    return w


def vtrace(
    behaviour_logp,
    target_logp,
    rewards,
    values,
    bootstrap_value,
    discounts,
    *,
    rho_clip=1.0,
    c_clip=1.0,
    pg_rho_clip=1.0,
):
    """V-trace as the sum in the IMPALA paper (eq. 1), then the pg advantages; returns (vs, adv).

    `vs_t = V_t + sum_{t' >= t} (prod_{k=t}^{t'-1} d_k c_k) * delta_t'`, with
    `delta_t = rho_t (r_t + d_t V_{t+1} - V_t)` and `V_T` the bootstrap value.
    """
    behaviour_logp, target_logp, rewards, values, bootstrap_value, discounts = _f64(
        behaviour_logp, target_logp, rewards, values, bootstrap_value, discounts
    )
    T, B = rewards.shape
    rho = _rhos(target_logp, behaviour_logp, rho_clip)
    c = _rhos(target_logp, behaviour_logp, c_clip)
    pg_rho = _rhos(target_logp, behaviour_logp, pg_rho_clip)

    def value(t, b):
        return bootstrap_value[b] if t == T else values[t, b]

    vs = np.zeros((T, B))
    adv = np.zeros((T, B))
    for b in range(B):
        for t in range(T):
            total = values[t, b]
            for t2 in range(t, T):
                trace = 1.0
                for k in range(t, t2):
                    trace *= discounts[k, b] * c[k, b]
                delta = rho[t2, b] * (
                    rewards[t2, b] + discounts[t2, b] * value(t2 + 1, b) - values[t2, b]
                )
                total += trace * delta
            vs[t, b] = total
    for b in range(B):
        for t in range(T):
            vs_next = bootstrap_value[b] if t == T - 1 else vs[t + 1, b]
            adv[t, b] = pg_rho[t, b] * (rewards[t, b] + discounts[t, b] * vs_next - values[t, b])
    return vs, adv


def optimal_baseline(returns, grad_sq_norms):
    """`sum_i g_i^2 R_i / sum_i g_i^2`."""
    returns, grad_sq_norms = _f64(returns, grad_sq_norms)
    num = sum(g * r for g, r in zip(grad_sq_norms, returns, strict=True))
    return num / sum(grad_sq_norms)
