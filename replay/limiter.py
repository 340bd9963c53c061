"""`RateLimiter`: Reverb's samples-per-insert rule, in the one place it is coded.

With `samples_per_insert` = r, `tolerance` = e and `min_size_to_sample` = m, the limiter keeps
the sample credit `r * inserted - sampled` within `r * m +- e`: an insert that would lift it
above `r * m + e` waits for samples, and a sample of n fragments that would drop it below
`r * m - e` waits for inserts. Two exceptions keep the sides from waiting on each other:

- below m fragments held, inserts always go (the table cannot be sampled yet; Reverb does the
  same) and samples always wait;
- while a sampler waits, inserts always go: it may be waiting for fragments (a batch larger
  than the table) that the ratio alone would not let in.

Without a ratio (`samples_per_insert` None) only `min_size_to_sample` applies.

Plain bookkeeping with no lock and no waiting: its owner (`ReplayService`) calls it under its
own lock, waits on its own condition, and reports each committed insert and sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from replay.fields import FieldError


class RateLimiter:
    """Decides whether an insert or a sample of n fragments may go now.

    Raises `replay.fields.FieldError` (a ValueError naming the field) for settings under which
    an insert and a sample could both wait at once (a deadlock).
    """

    def __init__(
        self,
        samples_per_insert: float | None = None,
        tolerance: float = 0.0,
        min_size_to_sample: int = 1,
    ) -> None:
        if min_size_to_sample < 1:
            raise FieldError("min_size_to_sample", f"is {min_size_to_sample}: must be >= 1")
        spi = samples_per_insert
        if spi is None:
            if tolerance != 0.0:
                raise FieldError("tolerance", f"is {tolerance}: it needs samples_per_insert")
        elif spi <= 0:
            raise FieldError("samples_per_insert", f"is {spi}: must be > 0 (or None)")
        elif tolerance < (spi + 1) / 2:
            raise FieldError(
                "tolerance",
                f"is {tolerance}: with samples_per_insert {spi} it must be "
                f">= (samples_per_insert + 1) / 2 = {(spi + 1) / 2}, or an insert (which adds "
                "samples_per_insert of credit) and a sample (which spends 1) could both be "
                "blocked at once: a deadlock",
            )
        self.samples_per_insert = spi
        self.tolerance = tolerance
        self.min_size_to_sample = min_size_to_sample
        self.inserted = 0
        self.sampled = 0
        self._waiting_samplers = 0

    def restore(self, inserted: int, sampled: int) -> None:
        """Continue from these totals (a restored snapshot's counters)."""
        self.inserted, self.sampled = inserted, sampled

    def can_insert(self, size: int) -> bool:
        """Whether one insert may go now, with `size` fragments held."""
        spi = self.samples_per_insert
        if spi is None or self._waiting_samplers or size < self.min_size_to_sample:
            return True
        credit_after = spi * (self.inserted + 1) - self.sampled
        return credit_after <= spi * self.min_size_to_sample + self.tolerance

    def can_sample(self, n: int, size: int) -> bool:
        """Whether a sample of `n` fragments may go now, with `size` fragments held. (Whether
        the table holds n fragments its sampler would serve is the table's business.)"""
        if size < self.min_size_to_sample:
            return False
        spi = self.samples_per_insert
        if spi is None:
            return True
        credit_after = spi * self.inserted - self.sampled - n
        return credit_after >= spi * self.min_size_to_sample - self.tolerance

    def on_insert(self) -> None:
        self.inserted += 1

    def on_sample(self, n: int) -> None:
        self.sampled += n

    @contextlib.contextmanager
    def sampler_waiting(self) -> Iterator[None]:
        """Inserts are never held back inside this block: a sampler is waiting."""
        self._waiting_samplers += 1
        try:
            yield
        finally:
            self._waiting_samplers -= 1

    def check_batch_size(self, n: int) -> None:
        """Raise ValueError when a sample of `n` could wait at the same time as an insert.

        A sample of n waits while the credit is below `r * m - e + n`, an insert while it is
        above `r * m + e - r`: both at once unless `n <= 2 * e - r`.
        """
        spi = self.samples_per_insert
        if spi is None:
            return
        window = 2 * self.tolerance - spi
        if n > window:
            raise ValueError(
                f"batch_size {n} is above 2 * tolerance - samples_per_insert = {window}: the "
                "rate limiter could block this sample and every insert at once (a deadlock); "
                "raise tolerance"
            )
