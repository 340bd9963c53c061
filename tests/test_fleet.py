"""The driver's between-poll stats calls: a few actors at a time, every actor in turn."""

from __future__ import annotations

import itertools

from deploy.fleet import oldest_first


def test_asking_a_few_at_a_time_comes_round_to_every_actor_in_turn():
    ids = list(range(7))
    last_asked: dict[int, int] = {}
    asks = itertools.count()
    rounds = []
    for _ in range(6):
        picked = oldest_first(ids, last_asked, 3)
        assert len(picked) == 3
        last_asked.update((i, next(asks)) for i in picked)
        rounds.append(picked)
    asked = list(itertools.chain.from_iterable(rounds))  # 18 asks over 7 actors
    # Each actor is asked once before any is asked a second time, and so on.
    for lap in range(2):
        assert sorted(asked[lap * 7 : (lap + 1) * 7]) == ids
    assert {asked.count(i) for i in ids} == {2, 3}


def test_never_asked_actors_go_first_and_the_limit_holds():
    last_asked = {0: 5, 1: 1, 2: 3}
    assert oldest_first([0, 1, 2, 3], last_asked, 2) == [3, 1]  # 3 was never asked
    assert oldest_first([0, 1, 2, 3], last_asked, 10) == [3, 1, 2, 0]
    assert oldest_first([0, 1], last_asked, 0) == []
    assert oldest_first([], last_asked, 3) == []
