"""`Table`: the fragments a `ReplayService` holds, indexed for its samplers.

Plain data structure, not thread-safe: the service calls it under its lock and keeps the
counters, the rate limiter and the staleness rule. The table keeps every item in insertion
order (the oldest is evicted first), the never-sampled ones in a second ordered map (fifo, and
the fresh part of a mixed batch), and two `_IndexedSet`s for uniform choice: all items, and
those sampled at least once (the replayed part of a mixed batch).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from collections.abc import Iterable

from replay.trajectory import Fragment


@dataclasses.dataclass(eq=False)
class Item:
    """One stored fragment. `seq` (insertion order) is its key in the table."""

    seq: int
    fragment: Fragment
    nbytes: int
    times_sampled: int = 0


class _IndexedSet:
    """Items with O(1) add, remove and uniform choice (swap-with-last removal)."""

    def __init__(self) -> None:
        self._items: list[Item] = []
        self._pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Item) -> None:
        self._pos[item.seq] = len(self._items)
        self._items.append(item)

    def discard(self, item: Item) -> None:
        pos = self._pos.pop(item.seq, None)
        if pos is None:
            return
        last = self._items.pop()
        if last is not item:
            self._items[pos] = last
            self._pos[last.seq] = pos

    def choose(self, rng: random.Random, k: int) -> list[Item]:
        return [self._items[i] for i in rng.sample(range(len(self._items)), k)]


class Table:
    """The items held, oldest first, with O(1) add, remove and uniform choice."""

    def __init__(self) -> None:
        self._items: dict[int, Item] = {}  # every item, oldest first
        self._fresh: dict[int, Item] = {}  # never sampled, oldest first
        self._all = _IndexedSet()
        self._replayed = _IndexedSet()  # sampled at least once
        self._ids: set[str] = set()
        self.nbytes = 0
        #: times sampled -> how many of the items held were sampled that often
        self.times_sampled: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, fragment_id: str) -> bool:
        return fragment_id in self._ids

    @property
    def fresh(self) -> int:
        """How many items were never sampled."""
        return len(self._fresh)

    def items(self) -> Iterable[Item]:
        """Every item, oldest first."""
        return self._items.values()

    def oldest(self, *, fresh: bool = False) -> Item | None:
        """The oldest item (of the never-sampled ones with `fresh`), or None when there is none."""
        return next(iter((self._fresh if fresh else self._items).values()), None)

    def add(self, item: Item) -> None:
        self._items[item.seq] = item
        self._all.add(item)
        if item.times_sampled == 0:
            self._fresh[item.seq] = item
        else:
            self._replayed.add(item)
        self._ids.add(item.fragment.fragment_id)
        self.nbytes += item.nbytes
        self._count(item, +1)

    def remove(self, item: Item) -> None:
        del self._items[item.seq]
        self._all.discard(item)
        self._fresh.pop(item.seq, None)
        self._replayed.discard(item)
        self._ids.discard(item.fragment.fragment_id)
        self.nbytes -= item.nbytes
        self._count(item, -1)

    def pick(
        self, sampler: str, batch_size: int, replay_fraction: float, rng: random.Random
    ) -> list[Item]:
        """The items of a batch, or [] when the table cannot serve one; changes nothing.

        fifo: the oldest never-sampled items. uniform: without replacement among all.
        mixed: `round(batch_size * replay_fraction)` (at most as many as there are) uniformly
        from the sampled-before items, the rest the oldest never-sampled ones.
        """
        if sampler == "uniform":
            return self._all.choose(rng, batch_size) if len(self._all) >= batch_size else []
        n_replay = min(len(self._replayed), round(batch_size * replay_fraction))
        if len(self._fresh) < batch_size - n_replay:
            return []
        items = list(itertools.islice(self._fresh.values(), batch_size - n_replay))
        return items + self._replayed.choose(rng, n_replay)

    def mark_sampled(self, item: Item) -> None:
        """Count one more sample of `item` (a fresh item becomes a replayed one)."""
        self._count(item, -1)
        item.times_sampled += 1
        self._count(item, +1)
        if self._fresh.pop(item.seq, None) is not None:
            self._replayed.add(item)

    def _count(self, item: Item, delta: int) -> None:
        self.times_sampled[item.times_sampled] += delta
        if not self.times_sampled[item.times_sampled]:
            del self.times_sampled[item.times_sampled]
