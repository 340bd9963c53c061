"""A run's replay refuses schema-valid fragments that do not fit the run (issue 13, item 1).

Such a fragment (an action index out of range, observations of another shape or dtype, a policy
version beyond int64) used to pass the codec and then crash the learner in `evaluate` or
`Batch.stack`, and again after `--resume` because the snapshot kept it.
"""

from __future__ import annotations

import dataclasses

import pytest

from replay import codec
from replay.service import InsertResult, ReplayConfig, ReplayService
from replay.spec import FragmentSpec
from replay.trajectory import Batch, InvalidFragment, validate

SPEC = FragmentSpec(
    obs_shape=(4,), obs_dtype="float32", action_kind="discrete", action_dim=4, unroll_length=4
)


def _with(fragment, **changes):
    return dataclasses.replace(fragment, **changes)


def _misfits(make_fragment):
    good = make_fragment(4, 2)
    big = good.actions.copy()
    big[1, 0] = 10**6
    negative = good.actions.copy()
    negative[0, 1] = -5
    return {
        "action 10**6": (_with(good, actions=big), "spec_action"),
        "action -5": (_with(good, actions=negative), "spec_action"),
        "obs shape": (make_fragment(4, 2, obs_shape=(5,)), "spec_obs"),
        "obs dtype": (make_fragment(4, 2, obs_shape=(4,), obs_dtype="uint8"), "spec_obs"),
        "continuous actions": (make_fragment(4, 2, action_shape=(4,)), "spec_action"),
        "unroll length": (make_fragment(3, 2), "spec_shape"),
        "core state": (make_fragment(4, 2, core_size=8), "spec_core"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "action 10**6",
        "action -5",
        "obs shape",
        "obs dtype",
        "continuous actions",
        "unroll length",
        "core state",
    ],
)
def test_insert_refuses_schema_valid_fragments_that_do_not_fit_the_run(make_fragment, case):
    fragment, reason = _misfits(make_fragment)[case]
    validate(fragment)  # the schema alone admits it
    service = ReplayService(ReplayConfig.fifo_queue(), SPEC)
    assert service.insert(codec.encode(fragment)) is InsertResult.REJECTED
    assert service.insert_fragment(fragment) is InsertResult.REJECTED
    assert service.stats()["rejected"] == {reason: 2}
    assert service.stats()["size_fragments"] == 0
    good = make_fragment(4, 2)
    assert service.insert(codec.encode(good)) is InsertResult.ACCEPTED
    Batch.stack(service.sample_fragments(1, learner_version=0, timeout=0))


@pytest.mark.parametrize(
    ("field", "value"),
    [("policy_version", 2**64 - 1), ("actor_id", 2**63), ("actor_id", -(2**63))],
)
def test_metadata_beyond_int64_is_refused_by_the_codec(make_fragment, field, value):
    """`Batch.stack` casts both to int64: 2**64 - 1 used to become -1 there, silently."""
    data = codec.encode(_with(make_fragment(4, 2), **{field: value}), check=False)
    with pytest.raises(InvalidFragment, match=field) as err:
        codec.decode(data)
    assert err.value.reason == "metadata"
    service = ReplayService(ReplayConfig.fifo_queue())
    assert service.insert(data) is InsertResult.REJECTED
    assert service.stats()["rejected"] == {"metadata": 1}


def test_restore_drops_fragments_that_do_not_fit_and_counts_them(tmp_path, make_fragment):
    """A snapshot written before the spec was enforced (or by another run) must not bring a
    misfit back to the learner on `--resume`."""
    path = tmp_path / "replay.snap"
    unchecked = ReplayService(ReplayConfig.fifo_queue())
    bad = _misfits(make_fragment)["action 10**6"][0]
    for fragment in (make_fragment(4, 2), bad, make_fragment(4, 2)):
        assert unchecked.insert_fragment(fragment) is InsertResult.ACCEPTED
    unchecked.snapshot(path)

    config = dataclasses.replace(ReplayConfig.fifo_queue(), snapshot_path=str(path))
    restored = ReplayService(config, SPEC)
    stats = restored.stats()
    assert stats["size_fragments"] == 2
    assert stats["rejected"] == {"restore_spec_action": 1}
    batch = restored.sample(2, learner_version=0, timeout=0)
    assert bad.fragment_id not in batch.fragment_ids
    assert int(batch.actions.max()) < SPEC.action_dim
    # Without a spec the same snapshot restores all three (nothing else is dropped).
    assert ReplayService(config).stats()["size_fragments"] == 3


def test_a_continuous_spec_checks_the_action_vector(make_fragment):
    spec = FragmentSpec(obs_shape=(4,), obs_dtype="float32", action_kind="continuous", action_dim=2)
    spec.check(make_fragment(4, 2, action_shape=(2,)))
    with pytest.raises(InvalidFragment, match=r"\(2,\) float32") as err:
        spec.check(make_fragment(4, 2, action_shape=(3,)))
    assert err.value.reason == "spec_action"
