"""The driver's control calls are asked in one poll and taken in a later one (`deploy.inflight`):
a poll never waits on a slow callee, and a callee that never answers is given up, not waited for.
"""

from __future__ import annotations

import threading

import pytest
import ray

from deploy.inflight import InFlight


@ray.remote(num_cpus=0)
class Callee:
    """Answers `call` once `release` has been called (or at once, with `wait=False`)."""

    def __init__(self) -> None:
        self._released = threading.Event()

    def call(self, value: int, wait: bool = True) -> int:
        if wait:
            self._released.wait()
        return value

    def fail(self) -> None:
        raise ValueError("a bad answer")

    def release(self) -> None:
        self._released.set()


@pytest.fixture
def callee(local_ray):
    actor = Callee.options(max_concurrency=4).remote()
    ray.get(actor.__ray_ready__.remote())
    try:
        yield actor
    finally:
        ray.kill(actor, no_restart=True)


def test_a_call_not_back_is_left_in_flight_and_taken_once_back(callee):
    calls: InFlight[str] = InFlight("the test's calls", timeout_s=60.0)
    assert calls.take() is None  # nothing asked yet
    assert calls.ask(lambda: {"slow": callee.call.remote(1), "fast": callee.call.remote(2, False)})
    ray.get(callee.call.remote(0, wait=False))  # the fast call is back by now
    for _ in range(3):
        assert calls.take() is None  # the slow one is not: nothing is given, nothing waited for
    assert calls.busy
    made = []
    assert not calls.ask(lambda: made.append(1) or {"other": callee.call.remote(3, False)})
    assert made == [], "one set at a time: no call is even made while one is in flight"
    callee.release.remote()
    answers = calls.wait()
    assert answers == {"slow": 1, "fast": 2}
    assert not calls.busy and calls.take() is None  # each answer is given once
    assert calls.ask(lambda: {"next": callee.call.remote(4)})  # and the next set can go
    assert calls.wait() == {"next": 4}


def test_an_error_is_an_answer_and_a_call_past_its_timeout_is_given_up(callee):
    calls: InFlight[str] = InFlight("the test's calls", timeout_s=0.3)
    bad = callee.fail.remote()
    calls.ask(lambda: {"bad": bad, "never": callee.call.remote(5)})
    ray.wait([bad])
    answers = calls.wait()  # returns once the timeout has passed, although "never" is not back
    assert isinstance(answers["bad"], ray.exceptions.RayTaskError)
    assert isinstance(answers["never"], ray.exceptions.GetTimeoutError)
    assert "the test's calls" in str(answers["never"])
    assert calls.latency_s >= 0.3
    callee.release.remote()
    assert calls.take() is None  # the late answer is dropped, not given to a later take
