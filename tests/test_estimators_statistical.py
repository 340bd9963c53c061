"""What the seed claims about the estimators, checked on a tabular MDP solved exactly.

The MDP has 3 states, 2 actions, a fixed horizon of 3 steps, stochastic transitions, and rewards
with a large constant part (the seed's "+1 for surviving" example, where baselines matter). The
target policy `pi` is a softmax over logits `theta [S, A]`; `J(theta) = E_pi[sum_t r_t]`
(undiscounted, so the reward-to-go form targets exactly `grad J`). Its exact gradient comes from
dynamic programming (backward induction) differentiated by autograd. An estimator's gradient
for one episode is `sum_t w_t * grad_theta log pi(a_t | s_t)`, with the score of a softmax
`grad_theta[s] log pi(a | s) = onehot(a) - pi(. | s)` (and 0 for the other states' rows).

Two kinds of check:

- Exact: all 216 episodes are enumerated with their probabilities under the policy that acts, so
  an estimator's expectation and variance are computed exactly (no sampling error).
- Monte Carlo: 20 000 columns of 2 back-to-back episodes each (so episode ends fall mid-column)
  are sampled with a fixed seed, and the mean estimate is compared with the exact gradient in
  standard errors, the way the learner would see it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from learner import estimators as est

torch.set_num_threads(1)

S, A, H = 3, 2, 3
DT = torch.float64
P0 = torch.tensor([0.6, 0.3, 0.1], dtype=DT)
#: P[s, a, s'], transition probabilities.
P = torch.tensor(
    [
        [[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]],
        [[0.3, 0.6, 0.1], [0.1, 0.1, 0.8]],
        [[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]],
    ],
    dtype=DT,
)
#: r(s, a): action-dependent parts on top of a constant 2 per step.
REWARDS = torch.tensor([[1.0, 1.5], [1.2, 0.6], [2.0, 1.0]], dtype=DT) + 2.0
#: The target policy's logits.
THETA = torch.tensor([[0.7, -0.3], [0.4, 0.1], [-0.2, 0.6]], dtype=DT)
#: A behaviour policy far from the target: it prefers the other action in every state.
PHI_FAR = torch.tensor([[-0.6, 0.6], [0.9, -0.5], [0.8, -0.8]], dtype=DT)
#: A behaviour policy close to the target, 10% of the way towards PHI_FAR.
PHI_NEAR = THETA + 0.1 * (PHI_FAR - THETA)

EPISODES_PER_COLUMN = 2
N_COLUMNS = 20_000
#: |mean - exact| / standard error below this counts as agreement (for 3 free coordinates
#: per test, a 4-sigma miss by chance has probability ~2e-4).
Z_AGREE = 4.0
UNBIASED = ("reinforce", "reward_to_go", "trajectory_is", "per_decision_is")
BASELINES = (None, "mean", "value")


def exact_solution(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(grad J [S, A], V [H, S])` by backward induction; V[h, s] is the value at step h."""
    theta = theta.detach().clone().requires_grad_(True)
    pi = theta.softmax(-1)
    v = torch.zeros(S, dtype=DT)
    values = []
    for _ in range(H):
        q = REWARDS + P @ v
        v = (pi * q).sum(-1)
        values.append(v)
    j = P0 @ v
    (grad,) = torch.autograd.grad(j, theta)
    return grad, torch.stack(values[::-1]).detach()


GRAD, VALUES = exact_solution(THETA)


@dataclass(frozen=True)
class Columns:
    """Time-major episodes: states and actions int64 `[T, N]`, the rest float64."""

    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    discounts: torch.Tensor
    #: Probability of each column under the behaviour policy (exact enumeration only).
    probs: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.states.shape[1]

    def logp(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.log_softmax(-1)[self.states, self.actions]


def _episode_discounts(T: int, n: int) -> torch.Tensor:
    discounts = torch.ones(T, n, dtype=DT)
    discounts[H - 1 :: H] = 0.0  # the last step of every episode
    return discounts


def enumerate_episodes(behaviour_logits: torch.Tensor) -> Columns:
    """Every possible episode as one column, with its probability under the behaviour."""
    episodes = list(itertools.product(range(S), range(A), repeat=H))
    steps = torch.tensor(episodes).T  # [2H, N]: s0, a0, s1, a1, ...
    states, actions = steps[0::2], steps[1::2]
    mu = behaviour_logits.softmax(-1)
    probs = P0[states[0]]
    for t in range(H):
        probs = probs * mu[states[t], actions[t]]
        if t + 1 < H:
            probs = probs * P[states[t], actions[t], states[t + 1]]
    assert torch.isclose(probs.sum(), torch.tensor(1.0, dtype=DT))
    n = states.shape[1]
    return Columns(states, actions, REWARDS[states, actions], _episode_discounts(H, n), probs)


def sample_columns(behaviour_logits: torch.Tensor, seed: int) -> Columns:
    """N_COLUMNS columns of EPISODES_PER_COLUMN episodes each, sampled from the behaviour."""
    gen = torch.Generator().manual_seed(seed)
    mu = behaviour_logits.softmax(-1)
    T, n = H * EPISODES_PER_COLUMN, N_COLUMNS
    states = torch.empty(T, n, dtype=torch.long)
    actions = torch.empty(T, n, dtype=torch.long)
    for t in range(T):
        if t % H == 0:
            states[t] = torch.multinomial(P0.expand(n, S), 1, generator=gen).squeeze(1)
        else:
            nxt = P[states[t - 1], actions[t - 1]]
            states[t] = torch.multinomial(nxt, 1, generator=gen).squeeze(1)
        actions[t] = torch.multinomial(mu[states[t]], 1, generator=gen).squeeze(1)
    return Columns(states, actions, REWARDS[states, actions], _episode_discounts(T, n))


def weights(
    cols: Columns,
    estimator: str,
    baseline: str | None,
    behaviour_logits: torch.Tensor,
    rho_clip: float | None = None,
) -> torch.Tensor:
    if baseline == "value":  # the exact state value at the state's step within its episode
        step_in_episode = torch.arange(cols.states.shape[0])[:, None] % H
        baseline = VALUES[step_in_episode, cols.states]
    return est.pg_weights(
        cols.rewards,
        cols.discounts,
        torch.zeros(cols.n, dtype=DT),
        estimator=estimator,
        baseline=baseline,
        target_logp=cols.logp(THETA),
        behaviour_logp=cols.logp(behaviour_logits),
        rho_clip=rho_clip,
    )


def per_episode_gradients(cols: Columns, w: torch.Tensor) -> torch.Tensor:
    """`[N, S * A]`: each column's `sum_t w_t * score_t`, divided by its episode count."""
    pi = THETA.softmax(-1)
    score = torch.zeros(*cols.states.shape, S, A, dtype=DT)
    t_idx, n_idx = torch.meshgrid(
        torch.arange(cols.states.shape[0]), torch.arange(cols.n), indexing="ij"
    )
    onehot = torch.nn.functional.one_hot(cols.actions, A).to(DT)
    score[t_idx, n_idx, cols.states] = onehot - pi[cols.states]
    episodes = cols.states.shape[0] // H
    return (w[..., None, None] * score).sum(0).reshape(cols.n, S * A) / episodes


def exact_moments(estimator, baseline, behaviour_logits, rho_clip=None):
    """Exact `(mean [S * A], total variance)` of one episode's estimate."""
    cols = enumerate_episodes(behaviour_logits)
    g = per_episode_gradients(cols, weights(cols, estimator, baseline, behaviour_logits, rho_clip))
    mean = cols.probs @ g
    variance = cols.probs @ (g**2).sum(1) - (mean**2).sum()
    return mean, variance.item()


@pytest.fixture(scope="module")
def on_policy_sample() -> Columns:
    return sample_columns(THETA, seed=1)


@pytest.fixture(scope="module")
def off_policy_sample() -> Columns:
    return sample_columns(PHI_FAR, seed=2)


def z_scores(g: torch.Tensor, expected: torch.Tensor) -> np.ndarray:
    """Per coordinate: (sample mean - expected) / standard error of the mean."""
    se = g.std(0) / g.shape[0] ** 0.5
    return ((g.mean(0) - expected) / se).numpy()


# --------------------------------------------------------------------------------------------
# Exact expectations.


def test_the_dynamic_programme_agrees_with_enumeration():
    # J by enumerating all episodes under pi must equal the DP value, and the enumerated
    # likelihood-ratio gradient (reinforce) the DP's autograd gradient.
    cols = enumerate_episodes(THETA)
    returns = cols.rewards.sum(0)
    assert (cols.probs @ returns).item() == pytest.approx((P0 @ VALUES[0]).item(), rel=1e-12)
    assert GRAD.abs().min() > 0.05  # every coordinate is far from 0: a test that can fail


@pytest.mark.parametrize("baseline", [None, "value"])
@pytest.mark.parametrize(
    ("estimator", "behaviour"),
    [
        ("reinforce", THETA),
        ("reward_to_go", THETA),
        ("trajectory_is", PHI_FAR),
        ("per_decision_is", PHI_FAR),
        ("reduced_is", THETA),
        ("first_order_is", THETA),
    ],
)
def test_exact_expectation_of_unbiased_estimators_is_the_gradient(estimator, behaviour, baseline):
    mean, _ = exact_moments(estimator, baseline, behaviour)
    torch.testing.assert_close(mean, GRAD.flatten(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("baseline", [None, "value"])
@pytest.mark.parametrize("estimator", ["reduced_is", "first_order_is"])
def test_reduced_and_first_order_is_are_biased_when_behaviour_is_far(estimator, baseline):
    far, _ = exact_moments(estimator, baseline, PHI_FAR)
    near, _ = exact_moments(estimator, baseline, PHI_NEAR)
    bias_far = (far - GRAD.flatten()).norm() / GRAD.norm()
    bias_near = (near - GRAD.flatten()).norm() / GRAD.norm()
    assert bias_far > 0.08, f"relative bias only {bias_far:.3f}"
    assert bias_near < bias_far / 5, f"bias near {bias_near:.4f} vs far {bias_far:.4f}"


@pytest.mark.parametrize("estimator", ["reinforce", "reward_to_go", "per_decision_is"])
def test_on_policy_estimators_are_biased_off_policy(estimator):
    # Sanity of the set-up: without any correction, data from mu estimates the wrong gradient.
    if estimator == "per_decision_is":  # ... unless the correction is there
        mean, _ = exact_moments(estimator, None, PHI_FAR)
        torch.testing.assert_close(mean, GRAD.flatten(), rtol=1e-10, atol=1e-12)
        return
    mean, _ = exact_moments(estimator, "value", PHI_FAR)
    assert (mean - GRAD.flatten()).norm() > GRAD.norm()


def test_exact_variances_follow_the_seed():
    var = {
        (e, b, "on" if beh is THETA else "off"): exact_moments(e, b, beh)[1]
        for e, beh in [
            ("reinforce", THETA),
            ("reward_to_go", THETA),
            ("trajectory_is", PHI_FAR),
            ("per_decision_is", PHI_FAR),
        ]
        for b in (None, "value")
    }
    # Causality: dropping past rewards lowers the variance, on- and off-policy.
    assert var["reward_to_go", None, "on"] < 0.7 * var["reinforce", None, "on"]
    assert var["per_decision_is", None, "off"] < 0.5 * var["trajectory_is", None, "off"]
    # A state-dependent baseline lowers it further.
    assert var["reward_to_go", "value", "on"] < 0.1 * var["reward_to_go", None, "on"]
    assert var["per_decision_is", "value", "off"] < 0.5 * var["per_decision_is", None, "off"]
    assert var["trajectory_is", "value", "off"] < 0.5 * var["trajectory_is", None, "off"]
    # Off-policy correction costs variance: the same estimator on-policy is cheaper.
    assert var["reward_to_go", "value", "on"] < var["per_decision_is", "value", "off"]


def test_optimal_constant_baseline_minimises_the_exact_variance():
    cols = enumerate_episodes(THETA)
    score = per_episode_gradients(cols, torch.ones_like(cols.rewards))  # sum_t grad log pi
    returns = cols.rewards.sum(0)
    # Exact expectations: fold each episode's probability into its weight.
    b_star = est.optimal_baseline(returns, cols.probs * (score**2).sum(1)).item()

    def variance(b: float) -> float:
        constant = torch.full_like(cols.rewards, b)
        w = weights(cols, "reinforce", None, THETA) - constant
        g = per_episode_gradients(cols, w)
        mean = cols.probs @ g
        return (cols.probs @ (g**2).sum(1) - (mean**2).sum()).item()

    mean_return = (cols.probs @ returns).item()
    assert variance(mean_return) < 0.5 * variance(0.0)  # the seed's b = mean return helps ...
    for b in (0.0, mean_return, b_star - 0.3, b_star + 0.3):  # ... and b* is the best constant
        assert variance(b_star) < variance(b)


# --------------------------------------------------------------------------------------------
# Monte Carlo, as the learner sees it.


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("estimator", UNBIASED)
def test_sampled_unbiased_estimators_agree_with_the_exact_gradient(
    estimator, baseline, on_policy_sample, off_policy_sample
):
    off = estimator.endswith("_is")
    cols, behaviour = (off_policy_sample, PHI_FAR) if off else (on_policy_sample, THETA)
    g = per_episode_gradients(cols, weights(cols, estimator, baseline, behaviour))
    z = z_scores(g, GRAD.flatten())
    assert np.abs(z).max() < Z_AGREE, f"z-scores {np.round(z, 2)}"


@pytest.mark.parametrize("estimator", ["reduced_is", "first_order_is"])
def test_sampled_reduced_and_first_order_is_are_biased_far_off_policy(estimator, off_policy_sample):
    cols = off_policy_sample
    g = per_episode_gradients(cols, weights(cols, estimator, "value", PHI_FAR))
    # The samples agree with the estimator's own exact expectation ...
    expectation, _ = exact_moments(estimator, "value", PHI_FAR)
    assert np.abs(z_scores(g, expectation)).max() < Z_AGREE
    # ... which is many standard errors away from the true gradient.
    z = z_scores(g, GRAD.flatten())
    assert np.abs(z).max() > 3 * Z_AGREE, f"z-scores {np.round(z, 2)}"


def test_sampled_variance_drops_with_reward_to_go_and_baselines(on_policy_sample):
    cols = on_policy_sample

    def total_variance(estimator, baseline):
        g = per_episode_gradients(cols, weights(cols, estimator, baseline, THETA))
        return g.var(0).sum().item()

    assert total_variance("reward_to_go", None) < 0.7 * total_variance("reinforce", None)
    assert total_variance("reinforce", "mean") < 0.5 * total_variance("reinforce", None)
    # A per-time-step mean already removes most of it here (the return to go is mostly the
    # steps left times 2); the state's value removes more.
    assert total_variance("reward_to_go", "mean") < 0.05 * total_variance("reward_to_go", None)
    assert total_variance("reward_to_go", "value") < 0.9 * total_variance("reward_to_go", "mean")


def test_the_surrogate_loss_has_the_estimators_gradient(on_policy_sample):
    # The learner's loss -(w * target_logp).sum(0).mean(), differentiated by autograd, gives the
    # same gradient as the analytic scores used above.
    cols = on_policy_sample
    w = weights(cols, "reward_to_go", "value", THETA)
    theta = THETA.clone().requires_grad_(True)
    loss = -(w * cols.logp(theta)).sum(0).mean()
    (grad,) = torch.autograd.grad(loss, theta)
    analytic = per_episode_gradients(cols, w).mean(0) * EPISODES_PER_COLUMN
    torch.testing.assert_close(-grad.flatten(), analytic)
