"""The learner: loss goes down, the layout boundary, NaN skips, checkpoints, prefetch, publish."""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time

import numpy as np
import pytest
import torch

from learner.estimators import ESTIMATORS
from learner.learner import Learner, LearnerConfig
from learner.loss import loss_inputs
from learner.metrics import StepMetrics
from learner.policy import PolicySpec
from learner.prefetch import to_tensors
from replay.trajectory import Batch

torch.set_num_threads(1)

SPEC = PolicySpec((4,), "float32", "discrete", 2)
LOG_HALF = math.log(0.5)


def make_batch(
    t: int = 8,
    b: int = 4,
    *,
    seed: int = 0,
    rewards: np.ndarray | None = None,
    actions: np.ndarray | None = None,
    terminated: np.ndarray | None = None,
    truncated: np.ndarray | None = None,
    behaviour_logp: np.ndarray | None = None,
    policy_version: int = 0,
    obs: np.ndarray | None = None,
) -> Batch:
    """A schema-shaped batch; autoreset is derived from the episode ends like an actor does."""
    rng = np.random.default_rng(seed)
    terminated = np.zeros((t, b), bool) if terminated is None else terminated
    truncated = np.zeros((t, b), bool) if truncated is None else truncated
    autoreset = np.zeros((t, b), bool)
    autoreset[1:] = (terminated | truncated)[:-1]
    return Batch(
        obs=rng.normal(size=(t + 1, b, 4)).astype(np.float32) if obs is None else obs,
        actions=rng.integers(0, 2, (t, b)) if actions is None else actions,
        rewards=np.zeros((t, b), np.float32) if rewards is None else rewards,
        terminated=terminated,
        truncated=truncated,
        autoreset=autoreset,
        behaviour_logp=(
            np.full((t, b), LOG_HALF, np.float32) if behaviour_logp is None else behaviour_logp
        ),
        core_state=np.zeros((2, b, 0), np.float32),
        policy_version=np.full(b, policy_version, np.int64),
        actor_id=np.zeros(b, np.int64),
        fragment_ids=("f0",),
    )


def flatten_policy(learner: Learner, value: float) -> None:
    """Uniform policy (logp = log 1/2 everywhere) and a constant value function V = value."""
    with torch.no_grad():
        learner.model.policy_head.weight.zero_()
        learner.model.policy_head.bias.zero_()
        learner.model.value_head.weight.zero_()
        learner.model.value_head.bias.fill_(value)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "offpg-learner-prefetch"]


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", 0.0),
        ("optimizer", "sgd"),
        ("lr_schedule", "cosine"),
        ("gamma", 1.5),
        ("estimator", "magic"),
        ("rho_clip", -1.0),
        ("batch_size", 0),
        ("device", "tpu"),
        ("max_nan_steps", 0),
        ("entropy_coef", -0.1),
        ("lr", float("nan")),
        ("gamma", float("nan")),
        ("checkpoint_every", float("inf")),
        ("prefetch", 10**9),
        ("batch_size", 10**9),
    ],
)
def test_config_errors_start_with_the_field_name(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        LearnerConfig(**{field: value})


def test_config_fields_are_documented_and_clips_allow_none():
    for f in dataclasses.fields(LearnerConfig):
        assert f.metadata.get("doc"), f.name
    LearnerConfig(rho_clip=None, c_clip=None, pg_rho_clip=None)
    with pytest.raises(ValueError, match=r"^lr_decay_steps: "):
        LearnerConfig(lr_schedule="linear")


# -- the layout boundary ---------------------------------------------------------------------


def test_truncation_fold_and_autoreset_mask_give_known_vtrace_targets():
    """Column 0: truncated at t=1 (bootstraps from V(obs[2]) = 2), autoreset at t=2 with a junk
    reward and log-prob; column 1: terminated at t=1 (no bootstrap). gamma = 0.9, V = 2."""
    gamma = 0.9
    rewards = np.array([[1, 1], [1, 1], [5, 5], [1, 1]], np.float32)
    truncated = np.zeros((4, 2), bool)
    terminated = np.zeros((4, 2), bool)
    truncated[1, 0] = terminated[1, 1] = True
    behaviour = np.full((4, 2), LOG_HALF, np.float32)
    behaviour[2] = -30.0  # meaningless at autoreset steps: must neither weigh nor cut
    batch = make_batch(
        4, 2, rewards=rewards, truncated=truncated, terminated=terminated, behaviour_logp=behaviour
    )
    config = LearnerConfig(gamma=gamma, value_coef=1.0, entropy_coef=0.0, lr=1e-9)
    learner = Learner(SPEC, config)
    flatten_policy(learner, 2.0)

    tb = to_tensors(batch, learner.device)
    ev = learner.model.evaluate(tb.obs, tb.actions)
    inp = loss_inputs(tb, ev.logp, ev.values, gamma)
    np.testing.assert_allclose(
        inp.rewards.cpu().numpy(), [[1, 1], [1 + gamma * 2.0, 1], [0, 0], [1, 1]], rtol=1e-6
    )
    np.testing.assert_allclose(
        inp.discounts.cpu().numpy(), [[gamma] * 2, [0, 0], [1, 1], [gamma] * 2]
    )
    np.testing.assert_array_equal(inp.mask.cpu().numpy(), [[1, 1], [1, 1], [0, 0], [1, 1]])
    np.testing.assert_allclose(
        inp.behaviour_logp.cpu().numpy(), np.full((4, 2), LOG_HALF), rtol=1e-6
    )
    np.testing.assert_allclose(inp.bootstrap_value.cpu().numpy(), [2.0, 2.0])

    # On-policy V-trace targets are n-step returns: vs_3 = 1 + 0.9 * 2 = 2.8, the autoreset
    # step passes it through unchanged, the episode boundary stops it.
    vs = np.array([[1 + gamma * 2.8, 1 + gamma * 1.0], [2.8, 1.0], [2.8, 2.8], [2.8, 2.8]])
    real = inp.mask.cpu().numpy() > 0
    expected_value_loss = 0.5 * ((vs - 2.0) ** 2)[real].mean()
    metrics = learner.step(batch)
    assert not metrics.skipped and metrics.samples == 6
    assert metrics.value_loss == pytest.approx(expected_value_loss, rel=1e-5)
    # The junk log-prob at the autoreset steps did not enter: every real rho is exactly 1.
    assert metrics.rho_mean == pytest.approx(1.0) and metrics.ess == pytest.approx(1.0)
    assert metrics.rho_clipped_frac == 0.0
    np.testing.assert_allclose(metrics.log_rho, np.zeros(6), atol=1e-6)
    # Policy term: pg advantages r + d * vs' - V at real steps, times log 1/2, negated.
    adv = np.array([[1 + gamma * 2.8 - 2, 1 + gamma * 1.0 - 2], [0.8, -1.0], [0, 0], [0.8, 0.8]])
    assert metrics.policy_loss == pytest.approx(-(adv[real] * LOG_HALF).mean(), rel=1e-5)


def test_terminated_wins_over_truncated():
    both = np.zeros((2, 1), bool)
    both[0] = True
    batch = make_batch(2, 1, rewards=np.ones((2, 1), np.float32), terminated=both, truncated=both)
    learner = Learner(SPEC, LearnerConfig())
    flatten_policy(learner, 3.0)
    tb = to_tensors(batch, learner.device)
    ev = learner.model.evaluate(tb.obs, tb.actions)
    inp = loss_inputs(tb, ev.logp, ev.values, 0.9)
    np.testing.assert_allclose(inp.rewards.cpu().numpy(), [[1.0], [0.0]])
    np.testing.assert_allclose(inp.discounts.cpu().numpy(), [[0.0], [1.0]])


def test_reward_scale_then_clip_apply_to_real_steps_only():
    rewards = np.array([[4.0], [-0.5], [30.0]], np.float32)
    ended = np.zeros((3, 1), bool)
    ended[1] = True  # step 2 is then an autoreset step: its junk reward must stay 0
    batch = make_batch(3, 1, rewards=rewards, terminated=ended)
    learner = Learner(SPEC, LearnerConfig())
    tb = to_tensors(batch, learner.device)
    ev = learner.model.evaluate(tb.obs, tb.actions)
    inp = loss_inputs(tb, ev.logp, ev.values, 0.9, reward_scale=0.5, reward_clip=1.0)
    np.testing.assert_allclose(inp.rewards.cpu().numpy(), [[1.0], [-0.25], [0.0]])


def test_importance_metrics_and_policy_lag():
    learner = Learner(SPEC, LearnerConfig())
    flatten_policy(learner, 0.0)
    behaviour = np.full((4, 3), LOG_HALF, np.float32)
    behaviour[0, 0] = math.log(0.25)  # rho = 2 at one step, clipped at 1
    learner.version = 5
    metrics = learner.step(make_batch(4, 3, behaviour_logp=behaviour, policy_version=2))
    rho = np.ones(12)
    rho[0] = 2.0
    assert metrics.rho_mean == pytest.approx(rho.mean(), rel=1e-5)
    assert metrics.rho_clipped_frac == pytest.approx(1 / 12)
    assert metrics.ess == pytest.approx(rho.sum() ** 2 / (12 * (rho**2).sum()), rel=1e-5)
    assert metrics.lag_mean == 3.0 and metrics.lag_max == 3
    np.testing.assert_array_equal(metrics.lag, [3, 3, 3])
    # No insert versions (the batch never went through a replay service): no split.
    scalars = metrics.scalars()
    assert math.isnan(scalars["staleness/acting_lag_mean"])
    assert math.isnan(scalars["learner/wait_ms"])  # only `run` waits for batches
    assert scalars["learner/step_ms"] > 0


def test_policy_lag_splits_into_acting_lag_and_data_age():
    """Column 0 was acted at v2 and reached replay at v4, column 1 acted at v2 with no insert
    version; at learner version 9: lag 7 = acting lag 2 + data age 5."""
    learner = Learner(SPEC, LearnerConfig())
    learner.version = 9
    batch = dataclasses.replace(
        make_batch(4, 2, policy_version=2), insert_version=np.array([4, -1], np.int64)
    )
    metrics = learner.step(batch)
    np.testing.assert_array_equal(metrics.lag, [7, 7])
    np.testing.assert_array_equal(metrics.staleness.acting_lag, [2])
    np.testing.assert_array_equal(metrics.staleness.data_age, [5])
    scalars = metrics.scalars()
    assert scalars["staleness/acting_lag_max"] == 2.0
    assert scalars["staleness/data_age_mean"] == 5.0


def test_loss_tags_are_the_weighted_terms_of_the_total_and_entropy_is_its_own():
    config = LearnerConfig(value_coef=0.5, entropy_coef=0.1)
    learner = Learner(SPEC, config)
    flatten_policy(learner, 0.0)  # uniform over 2 actions: entropy log 2
    s = learner.step(make_batch(4, 2, rewards=np.ones((4, 2), np.float32))).scalars()
    assert s["policy/entropy"] == pytest.approx(math.log(2), rel=1e-5)
    assert s["loss/entropy"] == pytest.approx(-0.1 * math.log(2), rel=1e-5)
    assert s["loss/value"] > 0
    total = s["loss/policy"] + s["loss/value"] + s["loss/entropy"]
    assert s["loss/total"] == pytest.approx(total, rel=1e-5)


# -- learning --------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["vtrace", *ESTIMATORS])
def test_steps_on_a_fixed_batch_lower_the_loss_and_favour_the_rewarded_action(estimator):
    """Action 1 earns reward 1, action 0 nothing: repeated steps on the same batch must lower
    the loss and raise pi(1 | s)."""
    torch.manual_seed(0)
    t, b = 8, 8
    actions = np.random.default_rng(1).integers(0, 2, (t, b))
    terminated = np.zeros((t, b), bool)
    # One-step episodes (each followed by an autoreset step): every estimator's weight is then
    # (rho times) r - V, so all of them must agree on which action to favour.
    terminated[::2] = True
    batch = make_batch(
        t, b, actions=actions, rewards=actions.astype(np.float32), terminated=terminated
    )
    config = LearnerConfig(estimator=estimator, lr=3e-3, entropy_coef=0.0, rho_clip=None)
    learner = Learner(SPEC, config)
    flatten_policy(learner, 0.0)
    obs = torch.as_tensor(batch.obs[:-1])

    def p_one() -> float:
        with torch.no_grad():
            logits, _ = learner.model(obs.reshape(-1, 4))
        return float(torch.softmax(logits, -1)[:, 1].mean())

    before = p_one()
    losses = [learner.step(batch).loss for _ in range(30)]
    assert losses[-1] < losses[0] - 0.05
    assert p_one() > before + 0.1
    assert learner.version == 30


def test_policy_clip_is_checked():
    with pytest.raises(ValueError, match=r"^policy_clip: must lie in \(0, 1\)"):
        LearnerConfig(policy_clip=1.5)
    with pytest.raises(ValueError, match=r"^policy_clip: .*estimator is 'reward_to_go'"):
        LearnerConfig(policy_clip=0.2, estimator="reward_to_go")


def _policy_grads(config: LearnerConfig, batch: Batch) -> list[torch.Tensor]:
    """The gradient of one step from the uniform policy with V = 0 (no entropy term)."""
    torch.manual_seed(0)
    learner = Learner(SPEC, config)
    flatten_policy(learner, 0.0)
    learner.step(batch)
    return [p.grad.clone() for p in learner.model.parameters() if p.grad is not None]


def test_policy_clip_gradient_is_vtraces_on_policy():
    """At r = 1 (behaviour = target) the surrogate's gradient is V-trace's policy gradient."""
    rewards = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
    batch = make_batch(rewards=rewards)
    base = {"entropy_coef": 0.0, "max_grad_norm": 1e9}
    plain = _policy_grads(LearnerConfig(**base), batch)
    clipped = _policy_grads(LearnerConfig(**base, policy_clip=0.2), batch)
    assert len(plain) == len(clipped) and any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, clipped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("reward", "flows"), [(1.0, False), (-1.0, True)])
def test_policy_clip_stops_the_gradient_outside_the_trust_region(reward, flows):
    """pi = 1/2 where the behaviour had 1/5: r = 2.5 > 1 + e. With positive advantages the
    sample is already favoured beyond the region and adds nothing; with negative ones the
    unclipped term is the minimum and the gradient flows (PPO's pessimistic bound)."""
    t, b = 8, 4
    terminated = np.zeros((t, b), bool)
    terminated[::2] = True  # one-step episodes: A = r_t - V = reward
    batch = make_batch(
        t,
        b,
        rewards=np.full((t, b), reward, np.float32),
        terminated=terminated,
        behaviour_logp=np.full((t, b), math.log(0.2), np.float32),
    )
    config = LearnerConfig(entropy_coef=0.0, value_coef=0.0, max_grad_norm=1e9, policy_clip=0.2)
    grads = _policy_grads(config, batch)
    total = sum(float(g.abs().sum()) for g in grads)
    assert (total > 1e-3) is flows, total


def test_linear_lr_schedule_and_rmsprop():
    config = LearnerConfig(lr=1e-3, lr_schedule="linear", lr_decay_steps=4, optimizer="rmsprop")
    learner = Learner(SPEC, config)
    assert isinstance(learner.optimizer, torch.optim.RMSprop)
    lrs = [learner.step(make_batch()).lr for _ in range(5)]
    np.testing.assert_allclose(lrs, [1e-3, 0.75e-3, 0.5e-3, 0.25e-3, 0.0], atol=1e-12)


# -- non-finite steps ------------------------------------------------------------------------


def nan_batch() -> Batch:
    obs = np.random.default_rng(0).normal(size=(9, 4, 4)).astype(np.float32)
    obs[3, 1, 2] = np.nan
    return make_batch(obs=obs)


def test_non_finite_step_is_skipped_counted_and_not_published(tmp_path):
    published = []
    config = LearnerConfig(checkpoint_every=1e-9, max_nan_steps=3)
    learner = Learner(
        SPEC,
        config,
        checkpoint_dir=str(tmp_path),
        publish=lambda v, w: published.append(v),
    )
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    metrics = learner.step(nan_batch())
    assert metrics.skipped and metrics.version == 0 and learner.version == 0
    assert learner.counters["skipped_steps"] == 1
    assert published == [] and learner.checkpoints() == []
    for key, value in learner.model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    # A good step resets the consecutive count: two more bad ones do not reach the limit.
    assert not learner.step(make_batch()).skipped
    assert published == [1] and len(learner.checkpoints()) == 1
    learner.step(nan_batch())
    learner.step(nan_batch())
    assert learner.counters["skipped_steps"] == 3
    with pytest.raises(RuntimeError, match=r"3 consecutive .*max_nan_steps=3"):
        learner.step(nan_batch())


def test_diverged_parameters_raise_after_max_nan_steps():
    learner = Learner(SPEC, LearnerConfig(max_nan_steps=2))
    with torch.no_grad():
        learner.model.value_head.bias.fill_(float("inf"))
    assert learner.step(make_batch()).skipped
    with pytest.raises(RuntimeError, match="diverged"):
        learner.step(make_batch())


# -- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    config = LearnerConfig(checkpoint_every=3600.0)
    learner = Learner(SPEC, config, checkpoint_dir=str(tmp_path))
    for _ in range(3):
        learner.step(make_batch())
    learner.counters["env_steps"] = 1234
    path = learner.save_checkpoint()
    assert os.path.basename(path) == "ckpt-000000003.pt"
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
    state = torch.load(path, weights_only=True)  # plain containers only
    assert state["spec"] == SPEC.to_dict() and state["config"]["lr"] == config.lr

    other = Learner(SPEC, config, checkpoint_dir=str(tmp_path))
    assert other.restore_latest() == 3
    assert other.version == 3 and other.counters["env_steps"] == 1234
    assert other.counters["learner_samples"] == learner.counters["learner_samples"]
    for key, value in learner.model.state_dict().items():
        torch.testing.assert_close(other.model.state_dict()[key], value)
    # The optimiser state came along: the next step is identical on both.
    a, b = learner.step(make_batch(seed=5)), other.step(make_batch(seed=5))
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    for key, value in learner.model.state_dict().items():
        torch.testing.assert_close(other.model.state_dict()[key], value)


def test_no_checkpoint_restores_nothing(tmp_path):
    assert Learner(SPEC, LearnerConfig(), checkpoint_dir=str(tmp_path)).restore_latest() is None


def test_keep_last_k_and_time_based_checkpoints(tmp_path):
    config = LearnerConfig(checkpoint_every=1e-9, keep_checkpoints=2)
    learner = Learner(SPEC, config, checkpoint_dir=str(tmp_path))
    for _ in range(5):
        learner.step(make_batch())  # each step is past checkpoint_every: one file per step
    names = sorted(os.listdir(tmp_path))
    assert names == ["ckpt-000000004.pt", "ckpt-000000005.pt"]


def test_corrupt_latest_falls_back_to_previous(tmp_path):
    learner = Learner(SPEC, LearnerConfig(), checkpoint_dir=str(tmp_path))
    learner.step(make_batch())
    learner.save_checkpoint()
    learner.step(make_batch())
    newest = learner.save_checkpoint()
    with open(newest, "r+b") as f:  # a crash mid-copy: the newest file is truncated
        f.truncate(os.path.getsize(newest) // 2)
    other = Learner(SPEC, LearnerConfig(), checkpoint_dir=str(tmp_path))
    assert other.restore_latest() == 1


def test_checkpoint_of_a_different_network_is_refused(tmp_path):
    learner = Learner(SPEC, LearnerConfig(), checkpoint_dir=str(tmp_path))
    learner.save_checkpoint()
    wider = dataclasses.replace(SPEC, hidden_sizes=(32, 32))
    other = Learner(wider, LearnerConfig(), checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"different network: hidden_sizes: .*torso\.0\.weight"):
        other.restore_latest()
    assert other.version == 0


# -- run, prefetch and publishing ------------------------------------------------------------


def test_run_consumes_all_batches_and_joins_the_prefetch_thread():
    learner = Learner(SPEC, LearnerConfig(prefetch=2))
    seen: list[StepMetrics] = []
    steps = learner.run([make_batch(seed=i) for i in range(6)], on_step=seen.append)
    assert steps == 6 and len(seen) == 6 and learner.version == 6
    assert prefetch_threads() == []


def test_run_times_the_wait_for_batches_and_the_publish_apart_from_the_step():
    def slow_batches():
        for i in range(4):
            time.sleep(0.2)
            yield make_batch(seed=i)

    # A sleep lasts at least its time: lower bounds hold on a loaded machine too.
    seen: list[StepMetrics] = []
    Learner(SPEC, LearnerConfig(prefetch=1)).run(slow_batches(), on_step=seen.append)
    assert sorted(m.wait_ms for m in seen)[1] >= 100
    seen = []
    learner = Learner(SPEC, LearnerConfig(), publish=lambda v, w: time.sleep(0.3))
    learner.run([make_batch(seed=i) for i in range(3)], on_step=seen.append)
    assert all(m.publish_ms >= 300 for m in seen)
    assert all(0 < m.step_ms < 300 for m in seen), "the publish is not part of the step"


def test_run_stops_at_max_steps_and_on_stop_event():
    def endless():
        while True:
            yield make_batch()

    learner = Learner(SPEC, LearnerConfig(prefetch=3))
    assert learner.run(endless(), max_steps=4) == 4
    assert prefetch_threads() == []
    stop = threading.Event()

    def on_step(metrics: StepMetrics) -> None:
        if metrics.version >= 7:
            stop.set()

    assert learner.run(endless(), stop=stop, on_step=on_step) == 3
    assert prefetch_threads() == []


def test_producer_exception_is_reraised_and_thread_joined():
    def broken():
        yield make_batch()
        raise OSError("replay service went away")

    learner = Learner(SPEC, LearnerConfig())
    with pytest.raises(OSError, match="replay service went away"):
        learner.run(broken())
    assert learner.version == 1
    assert prefetch_threads() == []


def test_consumer_exception_joins_thread():
    def endless():
        while True:
            yield make_batch()

    def on_step(metrics: StepMetrics) -> None:
        raise KeyError("logger failed")

    learner = Learner(SPEC, LearnerConfig(prefetch=1))
    with pytest.raises(KeyError, match="logger failed"):
        learner.run(endless(), on_step=on_step)
    assert prefetch_threads() == []


def test_publish_cadence_and_payload():
    published: list[tuple[int, dict[str, np.ndarray]]] = []
    learner = Learner(
        SPEC, LearnerConfig(publish_every=3), publish=lambda v, w: published.append((v, w))
    )
    learner.publish_weights()  # the initial weights, before actors start
    snapshots = {}
    learner.run(
        [make_batch(seed=i) for i in range(10)],
        on_step=lambda m: snapshots.setdefault(
            m.version, {k: v.clone() for k, v in learner.model.state_dict().items()}
        ),
    )
    assert [v for v, _ in published] == [0, 3, 6, 9]
    _, weights = published[-1]
    for key, value in snapshots[9].items():
        assert isinstance(weights[key], np.ndarray)
        np.testing.assert_array_equal(weights[key], value.cpu().numpy())
    assert not np.array_equal(weights["value_head.bias"], snapshots[10]["value_head.bias"])
