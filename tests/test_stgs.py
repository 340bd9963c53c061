"""STGS, the straight-through Gumbel-softmax policy gradient: the pure sample, then (below) the
network's Q head and the learner's `estimator = "stgs"`."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from learner.estimators import straight_through_gumbel
from learner.policy import PolicySpec, make_policy

torch.set_num_threads(1)

#: Chi-square tests reject at this significance; each was run with a fixed seed, so the
#: outcome is deterministic, and a wrong sampler is rejected by a wide margin (see below).
ALPHA = 1e-3


def gumbel(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=generator, dtype=dtype).clamp(1e-12, 1 - 1e-12)
    return -(-u.log()).log()


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of Pearson's chi-square goodness-of-fit test of `counts` against `probs`."""
    n = counts.sum()
    expected = n * probs
    assert expected.min() >= 5, "too few expected counts for the chi-square approximation"
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic.double() / 2))


# -- the forward value -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [0.05, 1.0, 20.0])
def test_forward_is_exactly_one_hot_at_the_perturbed_argmax(dtype, tau):
    generator = torch.Generator().manual_seed(3)
    # Logits from moderate to extreme scales, so the soft sample ranges from near uniform to
    # near one-hot and every rounding case of `1 - s + s` is met.
    scale = torch.tensor([0.1, 1.0, 10.0, 100.0], dtype=dtype)[:, None, None, None]
    logits = scale * torch.randn((4, 64, 16, 7), generator=generator, dtype=dtype)
    noise = gumbel(tuple(logits.shape), seed=4, dtype=dtype)
    sample = straight_through_gumbel(logits.requires_grad_(), tau=tau, noise=noise)
    assert sample.dtype == dtype and sample.shape == logits.shape
    values = sample.detach()
    assert bool(((values == 0) | (values == 1)).all())
    assert bool((values.sum(-1) == 1).all())
    expected = (logits.detach() + noise).argmax(-1)
    assert torch.equal(values.argmax(-1), expected)


def test_a_single_action_is_always_taken():
    sample = straight_through_gumbel(torch.zeros(5, 1), tau=0.5)
    assert torch.equal(sample, torch.ones(5, 1))


def test_argmax_frequencies_follow_softmax_of_the_logits():
    """The Gumbel-max property: argmax(l + g) ~ softmax(l) (chi-square test, 100k samples).

    tau does not enter the forward value (the test above), so one tau covers them all.
    """
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, -2.0], dtype=torch.float64)
    torch.manual_seed(7)  # the default noise comes from torch's global generator
    samples = straight_through_gumbel(logits.expand(1000, 100, 5), tau=0.5)
    counts = samples.sum((0, 1))
    assert chi_square_p(counts, logits.softmax(-1)) > ALPHA
    # The test has the power to see a sampler whose temperature is 10% off.
    assert chi_square_p(counts, logits.div(1.1).softmax(-1)) < 1e-12


def test_default_noise_is_reproducible_from_the_global_seed():
    logits = torch.randn(32, 4)
    torch.manual_seed(11)
    first = straight_through_gumbel(logits, tau=1.0)
    torch.manual_seed(11)
    assert torch.equal(straight_through_gumbel(logits, tau=1.0), first)


# -- the backward pass ------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.1, 0.7, 3.0])
def test_backward_equals_autograd_through_the_soft_sample(tau):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn((6, 4, 5), generator=generator, dtype=torch.float64)
    weights = torch.randn((6, 4, 5), generator=generator, dtype=torch.float64)
    noise = gumbel((6, 4, 5), seed=6)

    leaf = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(
        (weights * straight_through_gumbel(leaf, tau=tau, noise=noise)).sum(), leaf
    )

    soft_leaf = logits.clone().requires_grad_()
    soft = torch.softmax((soft_leaf + noise) / tau, -1)
    (soft_grad,) = torch.autograd.grad((weights * soft).sum(), soft_leaf)
    torch.testing.assert_close(grad, soft_grad, rtol=1e-12, atol=1e-15)

    # And in closed form: d/dl_j sum_a w_a y_a = y_j (w_j - sum_a w_a y_a) / tau.
    y = soft.detach()
    closed = y * (weights - (weights * y).sum(-1, keepdim=True)) / tau
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-13)


def test_no_gradient_flows_through_the_hard_path():
    """The sample minus its soft part is the hard one-hot: a constant to autograd."""
    logits = torch.randn(8, 3, 4, dtype=torch.float64, requires_grad=True)
    noise = gumbel((8, 3, 4), seed=9).requires_grad_()
    tau = 0.5
    sample = straight_through_gumbel(logits, tau=tau, noise=noise)
    hard_part = sample - torch.softmax((logits + noise.detach()) / tau, -1)
    weights = torch.randn(8, 3, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((weights * hard_part).sum(), logits, retain_graph=True)
    assert torch.equal(grad, torch.zeros_like(grad))
    # Nor does any gradient reach the noise.
    sample.sum().backward()
    assert noise.grad is None


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0, 0.0, -0.5, math.nan, math.inf, True, "1", None])
def test_bad_tau_is_refused(tau):
    with pytest.raises(ValueError, match=r"^tau must be a positive finite number"):
        straight_through_gumbel(torch.zeros(2, 3), tau=tau)


def test_tau_is_keyword_only():
    with pytest.raises(TypeError):
        straight_through_gumbel(torch.zeros(2, 3), 1.0)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("logits", "noise", "message"),
    [
        (torch.zeros(2, 3, dtype=torch.int64), None, "logits must be float32 or float64"),
        (torch.tensor(1.0), None, "logits must be a non-empty"),
        (torch.zeros(2, 0), None, "logits must be a non-empty"),
        ([[0.0, 1.0]], None, "logits must be a torch.Tensor"),
        (torch.tensor([[0.0, math.nan]]), None, "logits contains NaN or inf"),
        (torch.zeros(2, 3), torch.zeros(3, 2), "noise has shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), "noise is torch.float64"),
        (torch.zeros(1, 2), torch.tensor([[0.0, math.inf]]), "noise contains NaN or inf"),
    ],
)
def test_bad_logits_and_noise_are_refused(logits, noise, message):
    with pytest.raises(ValueError, match=message):
        straight_through_gumbel(logits, tau=1.0, noise=noise)


# -- the network's Q head -----------------------------------------------------------------------

SPEC = PolicySpec((4,), "float32", "discrete", 3)
Q_SPEC = dataclasses.replace(SPEC, q_head=True)


def test_q_head_is_built_only_when_the_spec_asks_for_it():
    assert SPEC.q_head is False
    plain = make_policy(SPEC)
    assert plain.q_head is None
    assert not any(key.startswith("q_head") for key in plain.state_dict())
    obs, actions = torch.randn(6, 2, 4), torch.randint(0, 3, (5, 2))
    assert plain.evaluate(obs, actions).q_values is None

    model = make_policy(Q_SPEC)
    assert tuple(model.state_dict()["q_head.weight"].shape) == (3, 64)
    ev = model.evaluate(obs, actions)
    assert ev.q_values.shape == (5, 2, 3) and ev.policy_out.shape == (5, 2, 3)
    # Q(s, .) reads the critic's features (the MLP's own value torso), row by row.
    expected = model.q_head(model.value_torso(obs[:5].reshape(10, 4))).reshape(5, 2, 3)
    torch.testing.assert_close(ev.q_values, expected)


def test_q_head_spec_round_trips_and_refuses_continuous_actions():
    assert PolicySpec.from_dict(Q_SPEC.to_dict()) == Q_SPEC
    old = SPEC.to_dict()
    del old["q_head"]  # a spec saved before the field existed
    assert PolicySpec.from_dict(old) == SPEC
    with pytest.raises(ValueError, match="q_head needs discrete actions"):
        PolicySpec((3,), "float32", "continuous", 1, q_head=True)


def test_actors_act_the_same_with_or_without_a_q_head():
    """The Q head is built after the actor's layers, so one seed gives both networks the same
    actor, and `act` never runs the Q head."""
    torch.manual_seed(0)
    plain = make_policy(SPEC)
    torch.manual_seed(0)
    model = make_policy(Q_SPEC)
    obs = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    torch.manual_seed(1)
    first = plain.act(obs)
    torch.manual_seed(1)
    second = model.act(obs)
    np.testing.assert_array_equal(first.actions, second.actions)
    np.testing.assert_array_equal(first.logp, second.logp)
