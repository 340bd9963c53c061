"""Recurrent (LSTM) policies: the actor carries the core state and stores it per fragment, the
learner unrolls it with the same resets. The learner's unroll reproduces the actor's act path
step for step (resets inside a fragment included), a fragment boundary inside an episode changes
nothing, and the state survives the codec, the replay service, batching and checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scripted_env
import torch

from actors.config import ActorConfig
from actors.envs import EnvConfig, policy_spec, probe_spaces
from actors.ports import LocalWeights, MemorySink
from actors.rollout import RolloutActor
from deploy.config import JobConfig, PolicyConfig, RunConfig, load_config
from deploy.inprocess import InProcessRun
from learner.core import LSTMCore, episode_starts
from learner.learner import Learner, LearnerConfig
from learner.policy import PolicySpec, make_policy, state_dict_to_numpy
from replay import codec, snapshot
from replay.codec import decode
from replay.service import ReplayConfig
from replay.trajectory import Batch

torch.set_num_threads(1)
CORE = 8


def _spec(env_id: str, env_kwargs: dict | None = None, core_size: int = CORE) -> PolicySpec:
    env = EnvConfig(id=env_id, kwargs=env_kwargs or {})
    core = "lstm" if core_size else "none"
    return policy_spec(*probe_spaces(env), hidden_sizes=(16,), core=core, core_size=core_size)


def _weights(spec: PolicySpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh weights with random biases: a network initialised with zero biases maps a zero
    observation and a zero state to a zero state, which would hide where a state was reset."""
    torch.manual_seed(seed)
    weights = state_dict_to_numpy(make_policy(spec))
    rng = np.random.default_rng(seed)
    for name, value in weights.items():
        if name.endswith("bias"):
            weights[name] = value + rng.normal(0, 0.5, value.shape).astype(np.float32)
    return weights


def _actor(env_id: str, spec: PolicySpec, env_kwargs: dict | None = None, **actor_kwargs):
    weights = _weights(spec)
    actor = RolloutActor(
        0,
        EnvConfig(id=env_id, kwargs=env_kwargs or {}),
        ActorConfig(**actor_kwargs),
        spec,
        sink=MemorySink(),
        weights=LocalWeights(weights),
    )
    return actor, weights


def _evaluate(spec, weights, obs, actions, core_state, autoreset):
    policy = make_policy(spec)
    policy.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    with torch.no_grad():
        return policy.evaluate(
            torch.as_tensor(obs),
            torch.as_tensor(actions),
            core_state=torch.as_tensor(core_state),
            autoreset=torch.as_tensor(autoreset),
        )


# -- where the state resets -------------------------------------------------------------------


def test_episode_starts_literal():
    """Row t >= 1 resets where step t - 1 was an autoreset step; the autoreset step itself and
    row 0 (stored after the actor's reset) do not."""
    f, t = False, True
    autoreset = torch.tensor([[f, t], [t, f], [f, f], [f, t]])
    expected = [[f, f], [f, t], [t, f], [f, f], [f, t]]
    assert episode_starts(autoreset).tolist() == expected


def test_actor_stores_a_zero_state_exactly_where_a_fragment_starts_an_episode():
    """Episodes of 3 steps plus one autoreset step (a 4-step cycle) in fragments of 3 steps:
    fragments start at steps 0, 3, 6, 9, 12. Step 0 and 12 start episodes (zero state); step 3
    is an autoreset step, which acts on the ending episode's final observation with that
    episode's state; steps 6 and 9 are inside episodes."""
    spec = _spec(scripted_env.CALLABLE_ID)
    actor, _ = _actor(scripted_env.CALLABLE_ID, spec, num_envs=1, unroll_length=3)
    fragments = [actor.collect() for _ in range(5)]
    assert [f.autoreset[0, 0] for f in fragments] == [False, True, False, False, False]
    assert [bool((f.core_state == 0).all()) for f in fragments] == [True, False, False, False, True]
    assert all(f.core_state.shape == (2, 1, CORE) for f in fragments)
    actor.close()


def test_the_new_episode_forgets_the_old_one_but_the_autoreset_step_remembers_it():
    """Changing observations before an episode end changes the outputs up to and including the
    autoreset step (its value is what a truncated step bootstraps from) and nothing after."""
    spec = PolicySpec((3,), "float32", "discrete", 2, hidden_sizes=(16,), core="lstm", core_size=4)
    weights = _weights(spec, seed=1)
    rng = np.random.default_rng(0)
    t_len = 6
    obs = rng.standard_normal((t_len + 1, 1, 3)).astype(np.float32)
    actions = np.zeros((t_len, 1), np.int64)
    autoreset = np.zeros((t_len, 1), bool)
    autoreset[3] = True  # step 2 ended an episode; step 4 is the new episode's first
    state = rng.standard_normal((2, 1, 4)).astype(np.float32)
    base = _evaluate(spec, weights, obs, actions, state, autoreset)
    changed = obs.copy()
    changed[:3] += 1.0
    other = _evaluate(spec, weights, changed, actions, state, autoreset)
    differs = (base.values - other.values).abs()[:, 0] > 1e-6
    assert differs.tolist() == [True, True, True, True, False, False, False]


# -- the learner's unroll is the actor's act path ----------------------------------------------


@pytest.mark.parametrize("continuous", [False, True])
def test_unroll_with_resets_equals_the_actors_steps(continuous):
    """Episodes of 3-5 steps in fragments of 7: resets inside fragments, at their first step and
    on an autoreset step at a boundary. The learner's log pi of every stored action, from the
    stored state with the same weights, is the log mu the actor recorded step by step."""
    kwargs = {"length": 3, "vary_length": True, "continuous": continuous}
    spec = _spec(scripted_env.CALLABLE_ID, kwargs)
    actor, weights = _actor(scripted_env.CALLABLE_ID, spec, kwargs, num_envs=3, unroll_length=7)
    fragments = [actor.collect() for _ in range(4)]
    assert any(f.autoreset[0].any() for f in fragments) and all(
        f.autoreset[1:].any() for f in fragments
    )
    for frag in fragments:
        ev = _evaluate(spec, weights, frag.obs, frag.actions, frag.core_state, frag.autoreset)
        np.testing.assert_allclose(ev.logp.numpy(), frag.behaviour_logp, rtol=0, atol=2e-5)
    actor.close()


def test_a_fragment_boundary_inside_an_episode_changes_nothing():
    """Two fragments of 8 steps evaluated from their stored states give what one fragment of 16
    steps gives from the first state: log-probs, entropies and values (the first fragment's
    bootstrap row is the second's first)."""
    spec = _spec("offpg/CartPoleNoVel-v1")
    actor, weights = _actor("offpg/CartPoleNoVel-v1", spec, num_envs=4, unroll_length=8)
    first, second = actor.collect(), actor.collect()
    actor.close()
    assert not second.autoreset[0].any()  # every episode runs through the boundary
    joined = {
        "obs": np.concatenate([first.obs[:-1], second.obs]),
        "actions": np.concatenate([first.actions, second.actions]),
        "core_state": first.core_state,
        "autoreset": np.concatenate([first.autoreset, second.autoreset]),
    }
    long = _evaluate(spec, weights, **joined)
    parts = [
        _evaluate(spec, weights, f.obs, f.actions, f.core_state, f.autoreset)
        for f in (first, second)
    ]
    close = dict(rtol=0, atol=2e-5)
    for name in ("logp", "entropy"):
        want = torch.cat([getattr(p, name) for p in parts])
        np.testing.assert_allclose(getattr(long, name).numpy(), want.numpy(), **close)
    values = torch.cat([parts[0].values[:-1], parts[1].values])
    np.testing.assert_allclose(long.values.numpy(), values.numpy(), **close)
    np.testing.assert_allclose(parts[0].values[-1].numpy(), parts[1].values[0].numpy(), **close)


# -- the state through the data path -----------------------------------------------------------


def test_the_codec_carries_the_state_and_batches_stack_it_along_the_env_axis():
    spec = _spec("offpg/CartPoleNoVel-v1")
    actor, _ = _actor("offpg/CartPoleNoVel-v1", spec, num_envs=3, unroll_length=4)
    fragments = [actor.collect() for _ in range(3)]
    actor.close()
    decoded = [decode(data) for data in actor._sink.items]
    for frag, back in zip(fragments, decoded, strict=True):
        np.testing.assert_array_equal(back.core_state, frag.core_state)
        assert back.core_state.dtype == np.float32
    batch = Batch.stack(decoded[1:])
    assert batch.core_state.shape == (2, 6, CORE)
    np.testing.assert_array_equal(batch.core_state[:, 3:], decoded[2].core_state)
    with pytest.raises(ValueError, match=r"core_state is \(2, 3, 5\)"):
        Batch.stack([decoded[0], dataclasses.replace(decoded[1], core_state=np.zeros((2, 3, 5)))])


def test_snapshots_keep_the_state_and_refuse_an_older_schema(tmp_path, make_fragment, monkeypatch):
    path = tmp_path / "replay.snapshot"
    fragment = make_fragment(core_size=3)
    snapshot.write(path, {"next_seq": 1}, [snapshot.Record(0, 0, fragment)])
    _, [record] = snapshot.read(path)
    np.testing.assert_array_equal(record.fragment.core_state, fragment.core_state)
    # What a build from before core_state wrote: its header and its fragments say version 1.
    monkeypatch.setattr(codec, "SCHEMA_VERSION", 1)
    snapshot.write(path, {"next_seq": 1}, [snapshot.Record(0, 0, fragment)])
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"schema_version 1 is older than this build's 2"):
        snapshot.read(path)


def test_in_process_run_at_lag_0_acts_with_exactly_the_learners_policy(tmp_path):
    """Actors -> codec -> replay -> batch of two actors' fragments -> learner, with lr large
    enough to move the weights every step: pi/mu is 1 at every step only if the learner's
    unroll reproduces the states the actors acted with. Then checkpoints keep the core."""
    config = JobConfig(
        run=RunConfig(num_actors=2),
        env=EnvConfig(id="offpg/CartPoleNoVel-v1", seed=5),
        actors=ActorConfig(num_envs=4, unroll_length=8),
        learner=LearnerConfig(lr=0.05, batch_size=2, device="cpu", policy_clip=0.2),
        replay=ReplayConfig.fifo_queue(capacity_fragments=64),
        policy=PolicyConfig(core="lstm", core_size=CORE),
    )
    run = InProcessRun(config)
    steps = []
    try:
        run.run(400, on_step=steps.append)
    finally:
        run.close()
    assert len(steps) == 7 and all(m.lag_max == 0 and not m.skipped for m in steps)
    assert all(abs(m.rho_mean - 1.0) < 1e-4 for m in steps), [m.rho_mean for m in steps]

    learner = run.learner
    learner.checkpoint_dir = str(tmp_path)
    learner.save_checkpoint()
    again = Learner(learner.spec, learner.config, checkpoint_dir=str(tmp_path))
    assert again.restore_latest() == learner.version
    for name, tensor in learner.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[name], tensor)
    feed_forward = dataclasses.replace(learner.spec, core="none", core_size=0)
    with pytest.raises(ValueError, match=r"core: checkpoint 'lstm', learner 'none'"):
        Learner(feed_forward, learner.config, checkpoint_dir=str(tmp_path)).restore_latest()


def test_a_feed_forward_checkpoint_written_before_the_core_fields_resumes(tmp_path):
    spec = PolicySpec((2,), "float32", "discrete", 2, hidden_sizes=(8,))
    Learner(spec, LearnerConfig(), checkpoint_dir=str(tmp_path)).save_checkpoint()
    (old,) = tmp_path.glob("*.pt")
    state = torch.load(old, weights_only=True)
    del state["spec"]["core"], state["spec"]["core_size"]
    torch.save(state, old)
    assert Learner(spec, LearnerConfig(), checkpoint_dir=str(tmp_path)).restore_latest() == 0


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]
)
def test_the_learner_unrolls_on_its_device_what_the_actor_stepped(device):
    """The core state goes with the batch to the learner's device (through the prefetch
    thread's copies) and the unroll there reproduces the actor's log-probs: pi/mu is 1 on the
    first step, taken with the actor's weights. The actor's act path runs on the device too."""
    spec = _spec("offpg/CartPoleNoVel-v1")
    actor, weights = _actor("offpg/CartPoleNoVel-v1", spec, num_envs=4, unroll_length=8)
    batch = Batch.stack([actor.collect() for _ in range(3)])
    actor.close()
    learner = Learner(spec, LearnerConfig(device=device, batch_size=3))
    learner.model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    steps: list = []
    learner.run([batch], on_step=steps.append)
    assert learner.device.type == device and len(steps) == 1
    assert abs(steps[0].rho_mean - 1.0) < 1e-4, steps[0].rho_mean
    state = np.zeros((2, 4, CORE), np.float32)
    out = learner.model.act(batch.obs[0, :4], state)
    assert isinstance(out.core_state, np.ndarray) and out.core_state.shape == (2, 4, CORE)


# -- the network's contract ---------------------------------------------------------------------


def test_spec_and_network_refuse_what_they_cannot_do():
    base = dict(obs_shape=(2,), obs_dtype="float32", action_kind="discrete", action_dim=2)
    with pytest.raises(ValueError, match="core must be one of"):
        PolicySpec(**base, core="gru", core_size=4)
    with pytest.raises(ValueError, match="core 'lstm' needs core_size >= 1"):
        PolicySpec(**base, core="lstm")
    with pytest.raises(ValueError, match="core_size is 4 but core is 'none'"):
        PolicySpec(**base, core_size=4)
    with pytest.raises(ValueError, match="shared by the policy and the value"):
        PolicySpec(**base, core="lstm", core_size=4, shared_torso=False)
    policy = make_policy(PolicySpec(**base, core="lstm", core_size=4))
    obs = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="acts with core_state"):
        policy.act(obs)
    with pytest.raises(ValueError, match=r"expected \[2, N, core_size\] = \(2, 3, 4\)"):
        policy.act(obs, np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="needs its core state"):
        policy(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="evaluates with core_state and autoreset"):
        policy.evaluate(torch.zeros(3, 1, 2), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"resets has shape \(2, 1\)"):
        LSTMCore(2, 4).unroll(torch.zeros(3, 1, 2), torch.zeros(2, 1, 4), torch.zeros(2, 1).bool())


# -- learning -------------------------------------------------------------------------------------

NOVEL = Path(__file__).parent.parent / "deploy" / "configs" / "cartpole_novel_lstm.toml"


@pytest.mark.slow
def test_the_lstm_learns_cartpole_without_velocities_past_what_a_feed_forward_policy_reaches():
    """`deploy/configs/cartpole_novel_lstm.toml` in process (no Ray), seed 0: the LSTM policy's
    mean return of the last 100 episodes reaches 100 within 120k env steps (it does at ~72k).
    The same recipe with a feed-forward policy (`policy.core = "none"`), which sees no
    velocity, never passes 60 within 500k env steps (seeds 0 and 1); `benchmarks/recurrent.py`
    runs both to the recipe's target."""
    config = load_config(NOVEL, ["learner.device=cpu"])
    assert config.policy.core == "lstm" and config.env.seed == 0
    run = InProcessRun(config, seed=0)
    try:
        result = run.run(120_000, 100.0)
    finally:
        run.close()
    assert result.curve[0][1] < 30, result.curve[:3]  # it starts from a near-random policy
    assert result.solved_at is not None, (result.env_steps, result.curve[-5:])
