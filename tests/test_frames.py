"""Stacked frames stored once per fragment (replay/frames.py): the stacks the learner rebuilds
are exactly the ones the actor acted on, across episode resets inside a fragment; the schema
and the learner's device-side rebuild agree."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from actors.config import ActorConfig
from actors.envs import (
    EnvConfig,
    env_seeds,
    make_vec_env,
    policy_spec,
    probe_spaces,
    seeded_reset,
)
from actors.ports import LocalWeights, MemorySink
from actors.rollout import RolloutActor
from deploy.config import load_config
from deploy.specs import job_fragment_spec, job_policy_spec
from learner.policy import make_policy, state_dict_to_numpy
from learner.prefetch import stack_frames, to_tensors
from replay import frames
from replay.codec import decode, encode
from replay.service import InsertResult, ReplayConfig, ReplayService
from replay.spec import FragmentSpec
from replay.trajectory import Batch, InvalidFragment, validate

FRAMES_ID = "frames_env:make"


def reference_stacks(
    frames_seq: np.ndarray, starts: np.ndarray, k: int, padding: str
) -> np.ndarray:
    """What a frame stacker does: `frames_seq [L, N, H, W]` with `starts [L, N]` (a new episode
    begins at that frame) -> stacks `[L, N, K, H, W]`, padded as Gymnasium's wrapper pads."""
    length, n = starts.shape
    out = np.empty((length, n, k, *frames_seq.shape[2:]), frames_seq.dtype)
    for col in range(n):
        stack = None
        for t in range(length):
            frame = frames_seq[t, col]
            if stack is None or starts[t, col]:
                pad = frame if padding == "reset" else np.zeros_like(frame)
                stack = [pad] * (k - 1) + [frame]
            else:
                stack = [*stack[1:], frame]
            out[t, col] = np.stack(stack)
    return out


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("padding", ["reset", "zero"])
def test_pack_then_unpack_gives_back_every_stack(k, padding):
    rng = np.random.default_rng(k)
    length, n = 40, 5
    seq = rng.integers(0, 256, (length, n, 3, 4), dtype=np.uint8)
    starts = rng.random((length, n)) < 0.3  # episodes of 1 step too: resets 1 row apart
    stacks = reference_stacks(seq, starts, k, padding)
    packed = frames.pack(stacks)
    assert packed.frames.shape == (length - 1 + k, n, 3, 4)
    assert len(packed.resets) <= starts[1:].sum()  # a reset that pads like the shift is free
    np.testing.assert_array_equal(frames.unpack(*_args(packed, k)), stacks)


def test_observations_that_are_not_frame_stacks_unpack_exactly_at_the_same_size():
    obs = np.random.default_rng(0).integers(0, 256, (9, 3, 4, 5, 5), dtype=np.uint8)
    packed = frames.pack(obs)
    assert len(packed.resets) == 8 * 3  # every row after the first
    assert packed.frames.nbytes + packed.heads.nbytes == obs.nbytes
    np.testing.assert_array_equal(frames.unpack(*_args(packed, 4)), obs)


def _args(packed: frames.Packed, k: int) -> tuple:
    return packed.frames, k, packed.resets, packed.heads


def _frames_actor(padding: str, num_envs: int = 3, unroll: int = 12, actor_id: int = 1):
    config = EnvConfig(id=FRAMES_ID, kwargs={"frame_stack": 4, "padding": padding})
    spec = policy_spec(*probe_spaces(config), network="mlp", hidden_sizes=(8,))
    sink = MemorySink()
    weights = LocalWeights(state_dict_to_numpy(make_policy(spec)))
    actor_config = ActorConfig(num_envs=num_envs, unroll_length=unroll)
    actor = RolloutActor(actor_id, config, actor_config, spec, sink=sink, weights=weights)
    return actor, sink, config


def _replayed(config: EnvConfig, actor_id: int, fragments: list) -> list[np.ndarray]:
    """The observations of `fragments`, from a fresh env with the actor's seeds and actions."""
    n = fragments[0].num_envs
    env = make_vec_env(config, num_envs=n, actor_id=actor_id)
    obs, _ = seeded_reset(env, env_seeds(config, actor_id, num_envs=n))
    out = []
    for frag in fragments:
        rows = [obs]
        for action in frag.actions:
            obs, *_ = env.step(action)
            rows.append(obs)
        out.append(np.stack(rows))
    env.close()
    return out


@pytest.mark.parametrize("padding", ["reset", "zero"])
def test_rebuilt_stacks_are_the_ones_the_actor_acted_on_across_resets(padding):
    actor, sink, config = _frames_actor(padding)
    for _ in range(3):
        actor.collect()
    actor.close()
    fragments = [decode(item) for item in sink.items]
    assert all(f.frame_stack == 4 and f.obs.shape == (12 + 4, 3, 6, 6) for f in fragments)
    assert sum(len(f.stack_resets) for f in fragments) >= 6, "no episode reset in a fragment"
    for frag, acted in zip(fragments, _replayed(config, 1, fragments), strict=True):
        rebuilt = frag.stacked_obs()
        np.testing.assert_array_equal(rebuilt, acted)
        # A stack never holds frames of two episodes (frame[0, 1] is the episode number).
        for t, col in frag.stack_resets:
            episodes = {int(e) for e in rebuilt[t, col, :, 0, 1]}
            assert len(episodes) == 1 or (padding == "zero" and len(episodes - {0}) <= 1)


def test_rebuilt_pong_stacks_are_the_ones_the_actor_acted_on_across_resets():
    pytest.importorskip("ale_py")
    # Episodes truncated after 40 emulator frames (10 agent steps): resets inside fragments.
    config = EnvConfig(id="ALE/Pong-v5", kwargs={"max_num_frames_per_episode": 40})
    spec = policy_spec(*probe_spaces(config))
    sink = MemorySink()
    weights = LocalWeights(state_dict_to_numpy(make_policy(spec)))
    actor = RolloutActor(
        0, config, ActorConfig(num_envs=2, unroll_length=16), spec, sink=sink, weights=weights
    )
    for _ in range(2):
        actor.collect()
    actor.close()
    fragments = [decode(item) for item in sink.items]
    assert all(f.obs.shape == (16 + 4, 2, 84, 84) for f in fragments)
    assert sum(len(f.stack_resets) for f in fragments) >= 2
    for frag, acted in zip(fragments, _replayed(config, 0, fragments), strict=True):
        np.testing.assert_array_equal(frag.stacked_obs(), acted)


def test_the_learner_rebuilds_a_batch_of_fragments_on_its_device():
    actor, sink, _ = _frames_actor("zero", num_envs=2, unroll=6)
    for _ in range(4):
        actor.collect()
    actor.close()
    fragments = [decode(item) for item in sink.items]
    batch = Batch.stack(fragments)
    assert batch.obs.shape == (6 + 4, 8, 6, 6) and len(batch.stack_resets) > 0
    expected = np.concatenate([f.stacked_obs() for f in fragments], axis=1)
    np.testing.assert_array_equal(batch.stacked_obs(), expected)
    tensors = to_tensors(batch, torch.device("cpu"))
    np.testing.assert_array_equal(tensors.obs.numpy(), expected)
    direct = stack_frames(
        torch.from_numpy(batch.obs.copy()),
        4,
        batch.stack_resets,
        torch.from_numpy(batch.stack_heads),
    )
    assert torch.equal(direct, tensors.obs)


def test_frame_stacked_fragments_round_trip_the_codec():
    actor, _, _ = _frames_actor("reset")
    frag = actor.collect()
    actor.close()
    back = decode(encode(frag))
    assert back.frame_stack == 4
    np.testing.assert_array_equal(back.stack_resets, frag.stack_resets)
    np.testing.assert_array_equal(back.stacked_obs(), frag.stacked_obs())
    assert back.nbytes == frag.nbytes


def test_replay_checks_the_stack_fields_at_insert_and_serves_the_acted_stacks_exactly():
    """Actor -> codec -> replay insert (with the job's spec) -> sample -> learner tensors: the
    stacks are the ones the env produced; broken stack fields are refused and counted."""
    actor, sink, config = _frames_actor("zero", num_envs=3, unroll=12)
    for _ in range(3):
        actor.collect()
    actor.close()
    fragments = [decode(item) for item in sink.items]
    acted = dict(
        zip((f.fragment_id for f in fragments), _replayed(config, 1, fragments), strict=True)
    )
    job = load_config(
        None,
        ["env.id=frames_env:make", "actors.num_envs=3", "actors.unroll_length=12"],
        check_env=False,
    )
    spec = job_fragment_spec(job, policy_spec(*probe_spaces(job.env), network="mlp"))
    service = ReplayService(ReplayConfig.fifo_queue(), spec)
    frag = fragments[0]
    assert len(frag.stack_resets) >= 1
    bad = {
        "invalid": dataclasses.replace(frag, stack_resets=frag.stack_resets * 0),
        "shape": dataclasses.replace(frag, stack_heads=frag.stack_heads[1:]),
        "spec_obs": dataclasses.replace(
            frag, obs=frag.stacked_obs(), frame_stack=1, stack_resets=None, stack_heads=None
        ),
    }
    for fragment in bad.values():
        assert service.insert(encode(fragment, check=False)) is InsertResult.REJECTED
    assert service.stats()["rejected"] == dict.fromkeys(bad, 1)
    for item in sink.items:
        assert service.insert(item) is InsertResult.ACCEPTED
    batch = service.sample(len(fragments), learner_version=0, timeout=0)
    expected = np.concatenate([acted[i] for i in batch.fragment_ids], axis=1)
    np.testing.assert_array_equal(to_tensors(batch, torch.device("cpu")).obs.numpy(), expected)


def _packed_fragment():
    actor, _, _ = _frames_actor("reset")
    frag = actor.collect()
    actor.close()
    assert len(frag.stack_resets) >= 2
    return frag


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: {"frame_stack": 0}, "frame_stack must be an int in [1, 64]"),
        (lambda f: {"frame_stack": 3}, "obs has shape (16, 3, 6, 6), expected [T+K=15"),
        (lambda f: {"stack_resets": f.stack_resets.astype(np.int64)}, "stack_resets must be int32"),
        (lambda f: {"stack_resets": f.stack_resets[::-1].copy()}, "in (t, n) order"),
        (lambda f: {"stack_resets": f.stack_resets * 0}, "1 <= t <= T=12"),
        (lambda f: {"stack_resets": f.stack_resets + np.int32([0, 3])}, "0 <= n < N=3"),
        (lambda f: {"stack_heads": f.stack_heads[1:]}, "stack_heads must be uint8 of shape"),
        (lambda f: {"stack_heads": f.stack_heads[:, :2]}, "stack_heads must be uint8 of shape"),
    ],
)
def test_bad_frame_stack_fields_are_refused_naming_the_field(change, message):
    frag = _packed_fragment()
    bad = dataclasses.replace(frag, **change(frag))
    with pytest.raises(InvalidFragment) as err:
        validate(bad)
    assert message in str(err.value)


def test_unstacked_fragments_carry_no_resets(make_fragment):
    frag = make_fragment(4, 2, obs_shape=(4, 5, 5), obs_dtype="uint8")
    assert frag.frame_stack == 1 and frag.stack_resets.shape == (0, 2)
    assert frag.stack_heads.shape == (0, 0, 4, 5, 5)  # K = 1: a "frame" is an observation
    assert frag.stacked_obs() is frag.obs
    bad = dataclasses.replace(frag, stack_resets=np.array([[1, 0]], np.int32))
    with pytest.raises(InvalidFragment, match="R = 0 when frame_stack is 1"):
        validate(bad)


def test_a_runs_fragment_spec_takes_its_frame_stacked_fragments_and_refuses_the_other_layout():
    frag = _packed_fragment()
    spec = FragmentSpec(
        obs_shape=(4, 6, 6), obs_dtype="uint8", action_kind="discrete", action_dim=3
    )
    with pytest.raises(InvalidFragment, match="frame_stack is 4, this run's fragments have 1"):
        spec.check(frag)
    stacked = dataclasses.replace(spec, frame_stack=4)
    assert stacked.check(frag) is frag
    unpacked = dataclasses.replace(
        frag, obs=frag.stacked_obs(), frame_stack=1, stack_resets=None, stack_heads=None
    )
    assert spec.check(validate(unpacked)) is unpacked
    with pytest.raises(InvalidFragment, match="obs rows are"):
        dataclasses.replace(stacked, obs_shape=(4, 6, 7)).check(frag)


def test_a_jobs_fragment_spec_says_how_its_actors_store_frames():
    config = load_config(None, ["env.id=frames_env:make"], check_env=False)
    spec = policy_spec(*probe_spaces(config.env), network="mlp")
    assert job_fragment_spec(config, spec).frame_stack == 4
    cartpole = load_config(None, ["env.id=CartPole-v1"])
    assert job_fragment_spec(cartpole, job_policy_spec(cartpole)).frame_stack == 1
