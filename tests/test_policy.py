"""Policy networks: heads on both action kinds, CNN shapes, spec and weight round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical

from learner.policy import (
    LOG_STD_MAX,
    LOG_STD_MIN,
    ActorCritic,
    PolicySpec,
    load_numpy_state_dict,
    make_policy,
    state_dict_to_numpy,
)

torch.set_num_threads(1)


def _cartpole_spec() -> PolicySpec:
    return PolicySpec((4,), "float32", "discrete", 2)


def _pendulum_spec() -> PolicySpec:
    return PolicySpec((3,), "float32", "continuous", 1, action_low=(-2.0,), action_high=(2.0,))


def test_spec_dict_round_trip_and_validation():
    for spec in (_cartpole_spec(), _pendulum_spec()):
        data = spec.to_dict()
        assert all(not isinstance(v, tuple) for v in data.values())
        assert PolicySpec.from_dict(data) == spec
    with pytest.raises(ValueError, match="unknown PolicySpec keys"):
        PolicySpec.from_dict({**_cartpole_spec().to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="network"):
        PolicySpec((4,), "float32", "discrete", 2, network="transformer")
    with pytest.raises(ValueError, match="3-D image"):
        PolicySpec((4,), "float32", "discrete", 2, network="impala_shallow")
    with pytest.raises(ValueError, match="action_low"):
        PolicySpec((3,), "float32", "continuous", 2, action_low=(0.0,), action_high=(1.0, 1.0))


def test_discrete_head_logp_entropy_and_actions():
    torch.manual_seed(0)
    policy = make_policy(_cartpole_spec())
    obs = torch.randn(6, 5, 4)  # [T+1, B, 4]
    actions = torch.randint(0, 2, (5, 5))
    ev = policy.evaluate(obs, actions)
    assert ev.logp.shape == (5, 5) and ev.entropy.shape == (5, 5) and ev.values.shape == (6, 5)

    logits, values = policy(obs.reshape(30, 4))
    dist = Categorical(logits=logits.reshape(6, 5, 2)[:5])
    torch.testing.assert_close(ev.logp, dist.log_prob(actions))
    torch.testing.assert_close(ev.entropy, dist.entropy())
    torch.testing.assert_close(ev.values, values.reshape(6, 5))
    # Manual formula: log softmax picked at the action.
    manual = torch.log_softmax(logits.reshape(6, 5, 2)[:5], -1).gather(-1, actions[..., None])
    torch.testing.assert_close(ev.logp, manual.squeeze(-1))

    out = policy.act(obs[0].numpy())
    assert out.actions.dtype == np.int64 and out.actions.shape == (5,)
    assert set(out.actions.tolist()) <= {0, 1}
    assert out.logp.dtype == np.float32 and out.logp.shape == (5,)
    again = policy.evaluate(obs[:2], torch.as_tensor(out.actions)[None]).logp[0]
    np.testing.assert_allclose(out.logp, again.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_act_samples_follow_the_distribution():
    torch.manual_seed(1)
    policy = make_policy(_cartpole_spec())
    with torch.no_grad():
        policy.policy_head.bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # p(1) ~ 0.75
        policy.policy_head.weight.zero_()
    out = policy.act(np.zeros((4000, 4), np.float32))
    assert abs(out.actions.mean() - 0.75) < 0.03
    np.testing.assert_allclose(out.logp[out.actions == 1], math.log(0.75), rtol=1e-5)
    greedy = policy.act(np.zeros((3, 4), np.float32), deterministic=True)
    assert greedy.actions.tolist() == [1, 1, 1]


def test_gaussian_head_matches_manual_formula():
    torch.manual_seed(2)
    spec = PolicySpec((3,), "float32", "continuous", 2, (-2.0, -2.0), (2.0, 2.0))
    policy = make_policy(spec)
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-0.5, 0.3]))
    obs = torch.randn(4, 3, 3)
    actions = torch.randn(3, 3, 2) * 3
    ev = policy.evaluate(obs, actions)
    raw, _ = policy(obs.reshape(12, 3))
    mean = 2.0 * torch.tanh(raw.reshape(4, 3, 2)[:3])  # squashed onto the bounds [-2, 2]
    std = torch.tensor([-0.5, 0.3]).exp()
    manual = (
        -((actions - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    ).sum(-1)
    torch.testing.assert_close(ev.logp, manual)
    entropy = (0.5 + 0.5 * math.log(2 * math.pi) + torch.log(std)).sum()
    torch.testing.assert_close(ev.entropy, entropy.expand(3, 3))

    out = policy.act(obs[0].numpy())
    assert out.actions.dtype == np.float32 and out.actions.shape == (3, 2)
    again = policy.evaluate(obs[:2], torch.as_tensor(out.actions)[None]).logp[0]
    np.testing.assert_allclose(out.logp, again.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_gaussian_samples_are_unclipped_and_log_std_is_clamped():
    torch.manual_seed(3)
    spec = PolicySpec((1,), "float32", "continuous", 1, (-0.1,), (0.1,))
    policy = make_policy(spec)
    out = policy.act(np.zeros((2000, 1), np.float32))
    # std 1 around ~0: many samples fall outside [-0.1, 0.1]; the env wrapper clips, not us.
    assert (np.abs(out.actions) > 0.1).mean() > 0.5
    assert abs(out.actions.std() - 1.0) < 0.1
    with torch.no_grad():
        policy.log_std.fill_(-50.0)
    scale = policy.distribution(torch.zeros(1, 1)).scale
    torch.testing.assert_close(scale, torch.full((1, 1), math.exp(LOG_STD_MIN)))
    with torch.no_grad():
        policy.log_std.fill_(50.0)
    scale = policy.distribution(torch.zeros(1, 1)).scale
    torch.testing.assert_close(scale, torch.full((1, 1), math.exp(LOG_STD_MAX)))


@pytest.mark.parametrize("network", ["impala_shallow", "impala_deep"])
@pytest.mark.parametrize("shape", [(84, 84, 4), (4, 84, 84)])
def test_cnn_shapes_for_atari_frames(network, shape):
    torch.manual_seed(4)
    spec = PolicySpec(shape, "uint8", "discrete", 6, network=network)
    policy = make_policy(spec)
    assert policy.value_torso is None  # CNNs share their torso by default
    obs = torch.randint(0, 256, (3, 2, *shape), dtype=torch.uint8)
    ev = policy.evaluate(obs, torch.randint(0, 6, (2, 2)))
    assert ev.logp.shape == (2, 2) and ev.values.shape == (3, 2)
    assert torch.isfinite(ev.logp).all() and torch.isfinite(ev.values).all()
    out = policy.act(obs[0].numpy())
    assert out.actions.shape == (2,) and ((out.actions >= 0) & (out.actions < 6)).all()


def test_uint8_scaling_happens_inside():
    spec = PolicySpec((84, 84, 4), "uint8", "discrete", 4)
    policy = make_policy(spec)
    raw = torch.randint(0, 256, (2, 84, 84, 4), dtype=torch.uint8)
    a, va = policy(raw)
    b, vb = policy(raw.float() / 255.0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(va, vb)


def test_numpy_state_dict_round_trip():
    torch.manual_seed(5)
    spec = _pendulum_spec()
    source, target = make_policy(spec), make_policy(spec)
    weights = state_dict_to_numpy(source)
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    assert any(not np.allclose(v, target.state_dict()[k].numpy()) for k, v in weights.items())
    load_numpy_state_dict(target, weights)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)
    # The numpy copy is independent of later training of the source.
    with torch.no_grad():
        source.log_std.add_(1.0)
    assert not np.allclose(weights["log_std"], source.log_std.detach().numpy())


def test_load_mismatch_names_what_differs_and_leaves_module_unchanged():
    small = make_policy(_cartpole_spec())
    spec = PolicySpec((4,), "float32", "discrete", 2, hidden_sizes=(32, 64))
    other: ActorCritic = make_policy(spec)
    before = state_dict_to_numpy(other)
    with pytest.raises(ValueError, match=r"torso\.0\.weight: expected \(32, 4\), got \(64, 4\)"):
        load_numpy_state_dict(other, state_dict_to_numpy(small))
    weights = state_dict_to_numpy(small)
    weights["extra"] = np.zeros(1, np.float32)
    del weights["value_head.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['value_head.bias'\].*unexpected keys"):
        load_numpy_state_dict(small, weights)
    after = state_dict_to_numpy(other)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_gaussian_mean_stays_inside_a_bounded_box():
    """The mean is squashed onto [low, high], so it cannot drift past a bound where every
    sample would clip to the same action; unbounded boxes keep the raw mean."""
    spec = PolicySpec((2,), "float32", "continuous", 1, (-0.5,), (1.5,))
    policy = make_policy(spec)
    with torch.no_grad():
        policy.policy_head.bias.fill_(100.0)
    mean = policy.distribution(policy(torch.zeros(3, 2))[0]).mean
    assert torch.all(mean <= 1.5) and torch.all(mean > 1.49)
    unbounded = make_policy(PolicySpec((2,), "float32", "continuous", 1, (-math.inf,), (math.inf,)))
    with torch.no_grad():
        unbounded.policy_head.bias.fill_(100.0)
    raw = unbounded(torch.zeros(3, 2))[0]
    torch.testing.assert_close(unbounded.distribution(raw).mean, raw)
