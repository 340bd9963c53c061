"""replay/limiter.py: the samples-per-insert rule on its own, table-driven, plus its invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.limiter import RateLimiter


def _limiter(spi, tol, min_size, inserted=0, sampled=0) -> RateLimiter:
    limiter = RateLimiter(spi, tol, min_size)
    limiter.restore(inserted, sampled)
    return limiter


# Each row: samples_per_insert, tolerance, min_size_to_sample, inserted, sampled, fragments held,
# n; then whether one more insert and a sample of n may go. With r, e, m the credit
# r * inserted - sampled must stay within r * m +- e.
DECISIONS = [
    # spi   tol  min ins smp size n  insert  sample
    (None, 0.0, 1, 0, 0, 0, 1, True, False),  # no ratio: only min_size holds samples back
    (None, 0.0, 1, 5, 90, 5, 5, True, True),
    (None, 0.0, 3, 2, 0, 2, 1, True, False),
    (1.0, 1.0, 1, 1, 0, 1, 1, True, True),  # insert -> credit 2 <= 1 + 1
    (1.0, 1.0, 1, 2, 0, 2, 1, False, True),  # insert -> 3 > 2: inserts ran ahead
    (1.0, 1.0, 1, 2, 2, 2, 1, True, False),  # sample -> 0 - 1 < 1 - 1: samples ran ahead
    (1.0, 1.0, 3, 2, 0, 2, 1, True, False),  # below min_size: inserts free, samples wait
    (1.0, 1.0, 3, 9, 0, 2, 1, True, False),  # min_size counts what is held, not inserted
    (1.0, 1.0, 3, 4, 0, 4, 1, False, True),  # insert -> 5 > 3 + 1
    (4.0, 4.0, 1, 2, 0, 2, 1, False, True),  # insert -> 12 > 4 + 4
    (4.0, 4.0, 1, 2, 4, 2, 1, True, True),  # insert -> 12 - 4 <= 8
    (4.0, 4.0, 1, 2, 8, 2, 1, True, False),  # sample -> 0 - 1 < 4 - 4
    (0.5, 2.0, 1, 5, 0, 5, 1, False, True),  # insert -> 3 > 2.5: half a sample per insert
    (0.5, 2.0, 1, 5, 1, 5, 3, True, True),  # insert -> 2 <= 2.5; sample -> -1.5 >= -1.5
    (0.5, 2.0, 1, 5, 0, 5, 3, False, True),  # sample -> 2.5 - 3 >= 0.5 - 2
    (0.5, 2.0, 1, 5, 2, 5, 3, True, False),  # sample -> 0.5 - 3 < 0.5 - 2
    (8.0, 64.0, 1, 1, 0, 1, 4, True, True),  # the CartPole recipe: plenty of slack both ways
    (8.0, 64.0, 1, 10, 0, 10, 4, False, True),  # insert -> 88 > 72
    (8.0, 64.0, 1, 1, 61, 1, 4, True, False),  # sample -> 8 - 61 - 4 < -56
]


@pytest.mark.parametrize(
    "spi, tol, min_size, inserted, sampled, size, n, insert_ok, sample_ok", DECISIONS
)
def test_decisions(spi, tol, min_size, inserted, sampled, size, n, insert_ok, sample_ok):
    limiter = _limiter(spi, tol, min_size, inserted, sampled)
    assert limiter.can_insert(size) == insert_ok
    assert limiter.can_sample(n, size) == sample_ok


def test_a_waiting_sampler_lets_every_insert_go_until_it_stops_waiting():
    limiter = _limiter(4.0, 8.0, 1, inserted=3, sampled=0)  # insert -> 16 > 12: held back
    assert not limiter.can_insert(3)
    with limiter.sampler_waiting():
        with limiter.sampler_waiting():
            assert limiter.can_insert(3)
        assert limiter.can_insert(3)  # one sampler still waits
        limiter.on_insert()
        assert limiter.can_insert(4)
    assert not limiter.can_insert(4)
    with pytest.raises(RuntimeError), limiter.sampler_waiting():
        raise RuntimeError("a sampler that fails still stops waiting")
    assert not limiter.can_insert(4)


def test_on_insert_and_on_sample_move_the_credit():
    limiter = RateLimiter(1.0, 1.0, 1)
    assert limiter.can_insert(0)
    limiter.on_insert()
    limiter.on_insert()
    assert not limiter.can_insert(2)
    limiter.on_sample(2)
    assert (limiter.inserted, limiter.sampled) == (2, 2)
    assert limiter.can_insert(2) and not limiter.can_sample(1, 2)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"min_size_to_sample": 0}, "min_size_to_sample"),
        ({"samples_per_insert": 0.0, "tolerance": 1.0}, "samples_per_insert"),
        ({"samples_per_insert": -1.0, "tolerance": 1.0}, "samples_per_insert"),
        ({"samples_per_insert": 4.0, "tolerance": 2.0}, "tolerance"),  # < (4 + 1) / 2
        ({"samples_per_insert": 1.0, "tolerance": 0.5}, "tolerance"),
        ({"tolerance": 3.0}, "tolerance"),  # a tolerance without a ratio
    ],
)
def test_refuses_settings_that_could_deadlock_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        RateLimiter(**kwargs)
    assert str(info.value).startswith(field)


@pytest.mark.parametrize(
    "spi, tol, largest_batch",
    [(None, 0.0, 10**9), (1.0, 1.0, 1), (1.0, 2.0, 3), (8.0, 64.0, 120), (0.5, 2.0, 3)],
)
def test_batch_size_window_is_two_tolerances_minus_the_ratio(spi, tol, largest_batch):
    limiter = RateLimiter(spi, tol)
    limiter.check_batch_size(largest_batch)
    if spi is not None:
        with pytest.raises(ValueError, match="deadlock"):
            limiter.check_batch_size(largest_batch + 1)


@st.composite
def _settings(draw):
    spi = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 8.0]))
    tol = (spi + 1) / 2 + draw(st.sampled_from([0.0, 0.5, 1.0, 4.0, 20.0]))
    min_size = draw(st.integers(1, 5))
    largest = int(2 * tol - spi)
    batches = draw(st.lists(st.integers(1, max(1, largest)), min_size=1, max_size=200))
    return spi, tol, min_size, batches


@settings(max_examples=150, deadline=None)
@given(_settings())
def test_credit_stays_in_its_band_and_one_side_can_always_move(setting):
    """Without removals and with no waiting sampler: after any sequence of allowed operations
    the credit is within r * m +- e, and an insert or a sample of 1 is always allowed."""
    spi, tol, min_size, batches = setting
    limiter = RateLimiter(spi, tol, min_size)
    size = 0
    for n in batches:  # each round: the sample of n if it may go, else an insert
        assert limiter.can_insert(size) or limiter.can_sample(1, size), "both sides blocked"
        if limiter.can_sample(n, size):
            limiter.on_sample(n)
        elif limiter.can_insert(size):
            limiter.on_insert()
            size += 1
        credit = spi * limiter.inserted - limiter.sampled
        if size >= min_size:
            assert spi * min_size - tol <= credit <= spi * min_size + tol
