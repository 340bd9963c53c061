"""`--search KEY=SPEC` for `offpg tune`: parse, check against the config, build Tune's spaces.

SPEC is `loguniform(A,B)`, `uniform(A,B)`, `choice(V,...)` or `grid(V,...)`, the values written
as TOML (as in `--set`). Every problem is a `ConfigError` naming the key, raised before Tune
starts: a malformed SPEC, an unknown key, a value the config refuses (each `choice`/`grid` value
and both ends of a range are tried), a key that names or places a trial (`run.*`: set those
with `--set`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Sequence
from typing import Any

from deploy.config import ConfigError, JobConfig, load_config

#: Keys a search may not set: they name a trial, place it or size its placement group.
FIXED_KEYS = ("run.",)
_SPEC_RE = re.compile(r"^\s*(uniform|loguniform|choice|grid)\s*\((.*)\)\s*$", re.DOTALL)
_SPEC_HELP = "loguniform(A,B), uniform(A,B), choice(V,...) or grid(V,...)"


@dataclasses.dataclass(frozen=True)
class Search:
    """One `--search KEY=SPEC`: `kind` is uniform, loguniform, choice or grid."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def domain(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        return tune.loguniform(low, high) if self.kind == "loguniform" else tune.uniform(low, high)

    def mutation(self) -> Any:
        """What PBT's explore step draws from: the list, or the range's distribution."""
        return list(self.values) if self.kind in ("grid", "choice") else self.domain()


def parse_search(text: str) -> Search:
    """`KEY=SPEC` -> `Search`; raises ConfigError naming what is wrong (the CLI exits 2)."""
    key, sep, spec = text.partition("=")
    key = key.strip()
    match = _SPEC_RE.match(spec)
    if not sep or not key or not match:
        raise ConfigError("--search", f"{text!r}: must be KEY=SPEC with SPEC {_SPEC_HELP}")
    if key.startswith(FIXED_KEYS):
        raise ConfigError(key, "cannot be searched: it names or places a trial; use --set")
    kind = match.group(1)
    try:
        values = tuple(tomllib.loads(f"v = [{match.group(2)}]")["v"])
    except tomllib.TOMLDecodeError:
        raise ConfigError(key, f"{spec.strip()!r}: the values must be TOML values") from None
    if not values:
        raise ConfigError(key, f"{kind}() needs at least one value")
    if kind in ("uniform", "loguniform"):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numbers or not values[0] < values[1]:
            raise ConfigError(key, f"{kind}(A,B) needs two numbers A < B, got {spec.strip()}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(key, f"loguniform(A,B) needs A > 0, got {spec.strip()}")
        values = tuple(float(v) for v in values)
    return Search(key, kind, values)


def flat_config(config: JobConfig) -> dict[str, Any]:
    """Every key of `config` as `section.key` -> value: `load_config(None, extra=...)` of it
    rebuilds `config` whatever the defaults are."""
    return {f"{s}.{k}": v for s, values in config.to_dict().items() for k, v in values.items()}


def trial_config(base: dict[str, Any], values: dict[str, Any], **run: Any) -> JobConfig:
    """The base config (`flat_config`) plus a trial's values and its `run.*` settings.

    Floats for integer keys (PBT's explore multiplies by 0.8 or 1.2) are rounded.
    """
    extra = dict(base)
    for key, value in values.items():
        if isinstance(value, float) and type(base.get(key)) is int:
            value = round(value)
        extra[key] = value
    extra.update({f"run.{k}": v for k, v in run.items()})
    return load_config(None, (), extra=extra)


def check_searches(config: JobConfig, searches: Sequence[Search], pbt: bool, trials: int) -> int:
    """Raise ConfigError for an unknown key or a value the config refuses, before Tune starts;
    returns the number of trials (`trials` samples, times each grid's size)."""
    base = flat_config(config)
    seen = set()
    for search in searches:
        if search.key == "learner.num_learners":
            raise ConfigError(search.key, "offpg tune runs one learner per trial")
        if search.key in seen:
            raise ConfigError(search.key, "searched twice")
        seen.add(search.key)
        for value in search.values:
            trial_config(base, {search.key: value})
    total = trials * math.prod(len(s.values) for s in searches if s.kind == "grid")
    if config.learner.num_learners > 1:
        raise ConfigError("learner.num_learners", "offpg tune runs one learner per trial: set 1")
    if pbt and total < 2:
        raise ConfigError("--trials", f"PBT needs a population of at least 2, got {total}")
    if pbt and not searches:
        raise ConfigError("--search", "PBT needs at least one searched key to perturb")
    return total
