"""The driver's bookkeeping without Ray: when points are due, rates over the time that elapsed,
per-actor breakdowns, and the env-step budget handed out in grants."""

from __future__ import annotations

import pytest

from deploy import metrics as tags
from deploy.budget import StepBudget
from deploy.fleet import ActorCounters
from deploy.points import (
    MAX_TICK_S,
    MIN_TICK_S,
    POINT_MAX_S,
    REPLAY_RATES,
    PointClock,
    Sample,
    Window,
)

REPLAY = dict.fromkeys(REPLAY_RATES, 0)


def sample(at, env_steps, actors, samples=0, **replay):
    return Sample(at, env_steps, samples, {**REPLAY, **replay}, actors)


def test_rates_divide_by_the_time_that_elapsed_between_polls():
    window = Window(seconds=1.0)
    window.add(
        sample(
            10.0,
            0,
            {0: ActorCounters(env_steps=0), 2: ActorCounters(env_steps=900, fragments=9)},
        )
    )
    # 3.7 s later (a slow poll): every rate is per second of that, not of any nominal interval.
    after = {
        0: ActorCounters(env_steps=3700, fragments=10, inference_s=0.2, env_s=0.5),
        1: ActorCounters(env_steps=500, fragments=5),  # new: not in both polls
        2: ActorCounters(env_steps=100, fragments=1),  # restarted: its counter went back
    }
    window.add(sample(13.7, 3700, after, samples=740, inserted=37, sampled=74, held_back=74))
    rates = window.rates()
    assert rates[tags.ENV_STEPS_PER_S] == pytest.approx(1000.0)
    assert rates[tags.LEARNER_SAMPLES_PER_S] == pytest.approx(200.0)
    assert rates[tags.REPLAY_INSERTED_PER_S] == pytest.approx(10.0)
    assert rates[tags.REPLAY_SAMPLED_PER_S] == pytest.approx(20.0)
    assert rates[tags.REPLAY_HELD_BACK_PER_S] == pytest.approx(20.0)
    scalars, histograms = window.actors()
    assert histograms[tags.ACTOR_ENV_STEPS_PER_S].tolist() == pytest.approx([1000.0])
    assert scalars[tags.ACTORS_INFERENCE_MS] == pytest.approx(20.0)  # 0.2 s over 10 fragments
    assert scalars[tags.ACTORS_ENV_MS] == pytest.approx(50.0)
    assert scalars[tags.ACTORS_BACKPRESSURE_MS] == 0.0


def test_the_window_keeps_about_its_length_of_polls():
    window = Window(seconds=1.0)
    for i in range(20):  # a poll every 0.1 s, 100 env steps each
        window.add(sample(i * 0.1, i * 100, {}))
    assert window.seconds == pytest.approx(1.0)
    assert window.rates()[tags.ENV_STEPS_PER_S] == pytest.approx(1000.0)


@pytest.mark.parametrize("slow", ["learner", "actors"])
def test_a_counter_moving_every_few_seconds_gets_its_rate_not_zero_and_spikes(slow):
    """A learner taking a 512-sample step every 3 s (or actors whose 512 env steps come every
    3 s), polled every 0.5 s: once it has moved three times, every rate is over whole moves,
    between 2/3 of 512 / 3 per second and that (a 1 s window read 0 in four polls of six and
    3x the rate in the other two), while the other counter, moving every poll, keeps its 1 s
    window. A counter that stops reads 0 once its last moves are `slowest` seconds old."""
    tag, fast_tag = tags.LEARNER_SAMPLES_PER_S, tags.ENV_STEPS_PER_S
    if slow == "actors":
        tag, fast_tag = fast_tag, tag

    def poll(at, slow_count):
        fast_count = int(at * 200)
        if slow == "learner":
            return sample(at, fast_count, {}, samples=slow_count)
        return sample(at, slow_count, {}, samples=fast_count)

    window = Window(seconds=1.0, slowest=30.0)
    true_rate, seen = 512 / 3.0, []
    for i in range(1, 61):  # 30 s
        at = i * 0.5
        window.add(poll(at, 512 * int(at // 3.0)))
        rates = window.rates()
        seen.append(rates.get(tag, 0.0))
        assert i == 1 or rates[fast_tag] == pytest.approx(200.0)
    steady = seen[18:]  # from the third move on (9 s)
    assert min(steady) >= 0.66 * true_rate and max(steady) <= true_rate * 1.0001
    for i in range(61, 140):  # it stops
        window.add(poll(i * 0.5, 512 * 10))
    assert window.rates()[tag] == 0.0


def test_points_are_due_by_env_steps_or_by_wall_time_never_twice_at_one_step():
    clock = PointClock(max_env_steps=2_000_000, env_steps=0, now=0.0)
    assert clock.steps_per_point == 1000
    assert not clock.due(999, 0.1)
    assert clock.due(1000, 0.1)
    clock.written(1000, 0.1)
    assert not clock.due(1500, 0.1 + POINT_MAX_S / 2)
    assert clock.due(1500, 0.1 + POINT_MAX_S)  # a slow run still gets a point a second
    assert not clock.due(1000, 100.0), "the actors stalled: no second point at the same step"


def test_the_poll_interval_follows_the_points_and_the_cost_of_a_poll():
    clock = PointClock(max_env_steps=2_000_000, env_steps=0, now=0.0)
    clock.polled(poll_s=0.001, env_steps_per_s=10_000)  # a point's worth: 0.1 s
    assert clock.tick_s() == pytest.approx(0.1)
    clock.polled(poll_s=0.001, env_steps_per_s=1e9)
    assert clock.tick_s() == MIN_TICK_S
    clock.polled(poll_s=0.001, env_steps_per_s=10)
    assert clock.tick_s() == MAX_TICK_S
    clock.polled(poll_s=0.08, env_steps_per_s=10_000)  # a large fleet: poll 10x less often
    assert clock.tick_s() == pytest.approx(0.8)


def simulate(budget: int, speeds: dict[int, int], fragment: int, restart_at: int | None = None):
    """Actors finishing `speeds[a]` fragments per poll while below the limit they know; a grant
    reaches an actor one poll after the driver sends it. Returns (total steps, limits seen)."""
    ledger = StepBudget(budget, fragment)
    counters = dict.fromkeys(speeds, 0)
    known = dict.fromkeys(speeds, 0)  # the limit each actor has received
    in_flight: dict[int, int] = {}
    gone = 0
    for poll in range(10_000):
        for actor, limit in in_flight.items():
            known[actor] = max(known[actor], limit)
        for actor, speed in speeds.items():
            for _ in range(speed):
                if counters[actor] < known[actor]:
                    counters[actor] += fragment
            assert counters[actor] < known[actor] + fragment or counters[actor] == 0
        if poll == restart_at:  # actor 0 dies and comes back with a fresh counter
            gone += counters[0]
            counters[0] = known[0] = 0
            ledger.forget(0)
        if gone + sum(counters.values()) >= budget or ledger.exhausted(gone):
            return gone + sum(counters.values())
        in_flight = ledger.grants(dict(counters), gone, now=poll * 0.1, poll_s=0.1)
    raise AssertionError("the budget never ran out")


@pytest.mark.parametrize("restart_at", [None, 7])
def test_the_budget_is_spent_to_within_one_fragment_per_actor(restart_at):
    fragment, speeds = 256, {0: 3, 1: 1, 2: 7}  # actors of very different speeds
    for budget in (1_000, 100_000, 1_234_567):
        total = simulate(budget, speeds, fragment, restart_at)
        assert budget <= total <= budget + len(speeds) * fragment, (budget, total)


def test_an_actor_that_leaves_frees_its_unused_allowance():
    ledger = StepBudget(10_000, fragment_steps=100)
    limits = ledger.grants({0: 0, 1: 0}, steps_gone=0, now=0.0, poll_s=0.1)
    assert sum(limits.values()) <= 10_000
    free_before = ledger.free(steps_gone=0)
    ledger.forget(1)  # it had done 300 steps: they are gone, the rest of its limit is free
    assert ledger.free(steps_gone=300) == free_before + limits[1] - 300
