"""Shared fixtures. Append only: several test modules depend on what is here."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from replay.trajectory import Fragment

_fragment_ids = itertools.count()


def _make_fragment(
    t: int = 4,
    n: int = 2,
    *,
    obs_shape: tuple[int, ...] = (4,),
    obs_dtype: str = "float32",
    action_shape: tuple[int, ...] = (),
    policy_version: int = 0,
    actor_id: int = 0,
    fragment_id: str | None = None,
    seed: int = 0,
    core_size: int = 0,
) -> Fragment:
    """A valid random fragment: discrete actions unless `action_shape`, episodes that end
    inside it, autoreset set exactly on the step after each end, and a random core state of
    `core_size` units (0: a feed-forward policy's empty one)."""
    rng = np.random.default_rng(seed)
    if obs_dtype == "uint8":
        obs = rng.integers(0, 256, (t + 1, n, *obs_shape), dtype=np.uint8)
    else:
        obs = rng.standard_normal((t + 1, n, *obs_shape)).astype(obs_dtype)
    if action_shape:
        actions = rng.standard_normal((t, n, *action_shape)).astype(np.float32)
    else:
        actions = rng.integers(0, 4, (t, n)).astype(np.int64)
    terminated = np.zeros((t, n), bool)
    truncated = np.zeros((t, n), bool)
    autoreset = np.zeros((t, n), bool)
    for step in range(t):
        if step > 0:
            autoreset[step] = terminated[step - 1] | truncated[step - 1]
        free = ~autoreset[step]
        terminated[step] = free & (rng.random(n) < 0.2)
        truncated[step] = free & ~terminated[step] & (rng.random(n) < 0.1)
    k = int((terminated | truncated).sum())
    return Fragment(
        obs=obs,
        actions=actions,
        rewards=rng.standard_normal((t, n)).astype(np.float32),
        terminated=terminated,
        truncated=truncated,
        autoreset=autoreset,
        behaviour_logp=-rng.random((t, n)).astype(np.float32),
        core_state=rng.standard_normal((2, n, core_size)).astype(np.float32),
        policy_version=policy_version,
        actor_id=actor_id,
        fragment_id=fragment_id if fragment_id is not None else f"f{next(_fragment_ids)}",
        episode_returns=rng.standard_normal(k).astype(np.float32),
        episode_lengths=rng.integers(1, 500, k).astype(np.int32),
    )


@pytest.fixture(scope="session")
def make_fragment():
    """Factory of valid `replay.trajectory.Fragment`s: `make_fragment(t, n, obs_shape=...)`."""
    return _make_fragment


_ROOT = Path(__file__).resolve().parents[1]


#: Logical CPUs of the test session's local Ray: a learner and a few actors.
RAY_CPUS = 4
#: Seconds a module's actors get to give their CPUs back after its last test.
RELEASE_S = 30.0


def _start_ray() -> None:
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level="ERROR")


@pytest.fixture(scope="session")
def _session_ray():
    """One local Ray for every module that asks for `local_ray` (it starts in seconds, many
    times over a suite), whose workers can import the repository and the test helpers (they
    inherit PYTHONPATH)."""
    old = os.environ.get("PYTHONPATH")
    paths = (str(_ROOT), str(_ROOT / "tests"), old)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    _start_ray()
    try:
        yield
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def local_ray(_session_ray):
    """The session's local Ray (`RAY_CPUS` logical CPUs), for one module.

    A module gives back every CPU its jobs and actors reserved (`train()` does, see
    `deploy.topology.Topology.release`). One that has not within `RELEASE_S` after its last test
    fails there, and the Ray is started afresh, so the next module is not starved by it."""
    if not ray.is_initialized():
        _start_ray()
    yield ray
    deadline = time.monotonic() + RELEASE_S
    while (free := ray.available_resources().get("CPU", 0.0)) < RAY_CPUS:
        if time.monotonic() > deadline:
            ray.shutdown()
            _start_ray()
            pytest.fail(
                f"the module's actors still held {RAY_CPUS - free:g} of the session Ray's "
                f"{RAY_CPUS} CPUs {RELEASE_S:g} s after its last test (Ray restarted)"
            )
        time.sleep(0.2)
