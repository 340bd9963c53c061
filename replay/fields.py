"""Config fields that check themselves: one declaration per setting.

Every component's frozen config dataclass (`actors.envs.EnvConfig`, `actors.config.ActorConfig`,
`learner.learner.LearnerConfig`, `replay.service.ReplayConfig` and the sections of
`deploy.config`) declares its fields with `setting(default, doc, ...)`: the neutral default,
the line of help `offpg config --keys` prints, and the values allowed (`ge`/`gt`/`le`/`lt`
bounds, `choices`, `max_len`). `check(config)`, first thing in `__post_init__`, enforces the
annotated type and those limits, and three rules that hold for every field:

- a float is finite (TOML reads `nan` and `inf` as floats, and no setting means "forever" by
  infinity: optional ones say so with None);
- an integer, and each integer of a tuple, lies within its declared bounds; every integer
  setting declares an upper bound (`le`), so no size is unbounded (tests/test_config.py checks
  the declarations);
- a string holds no control characters.

A violation raises `FieldError`: a `ValueError` whose `field` names the field and whose message
starts with it ("lr: must be > 0, got -1.0"); `deploy.config` prefixes the section (`learner.lr`)
for its one-line `ConfigError`. Rules that involve several fields stay in each `__post_init__`
and raise `FieldError` as well.

The module lives in `replay/` because that is the room every other room may import (`replay`
imports none of them), so all four share this one definition.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import types
import typing
from collections.abc import Sequence
from typing import Any


class FieldError(ValueError):
    """A config field holds a value it does not allow; `field` is the field's name."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def setting(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[str] | None = None,
    max_len: int | None = None,
) -> Any:
    """A dataclass field with its help text and its limits (checked by `check`).

    `ge`/`gt`/`le`/`lt` bound a number (each item of a tuple of numbers); `choices` lists the
    strings allowed; `max_len` bounds the length of a string or a tuple."""
    limits = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "max_len": max_len}
    metadata = {"doc": doc, **{k: v for k, v in limits.items() if v is not None}}
    return dataclasses.field(default=default, metadata=metadata)


def check(config: Any) -> None:
    """Raise `FieldError` for the first field of the dataclass `config` that breaks its type or
    its limits."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        if f.init:
            check_value(f.name, getattr(config, f.name), hints[f.name], f.metadata)


def check_value(name: str, value: Any, tp: Any, limits: typing.Mapping[str, Any]) -> None:
    """Check one value against its annotated type `tp` and `limits` (a field's metadata)."""
    tp, optional = _strip_none(tp)
    if value is None:
        if optional:
            return
        raise FieldError(name, f"must be {describe(tp, limits)}, got None")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        limits = {**limits, "choices": typing.get_args(tp)}
        tp = str
    if origin is tuple:
        if not isinstance(value, tuple | list):
            raise FieldError(name, f"must be a list, got {type(value).__name__} {short(value)}")
        if "max_len" in limits and len(value) > limits["max_len"]:
            raise FieldError(name, f"must have at most {limits['max_len']} entries")
        item = (typing.get_args(tp) or (Any,))[0]
        item_limits = {k: v for k, v in limits.items() if k != "max_len"}
        for i, v in enumerate(value):
            check_value(f"{name}[{i}]", v, item, item_limits)
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise FieldError(name, f"must be true or false, got {short(value)}")
    elif tp is int or tp is float:
        _check_number(name, value, tp, limits, optional)
    elif tp is str:
        _check_string(name, value, limits)


def _check_number(
    name: str, value: Any, tp: type, limits: typing.Mapping[str, Any], optional: bool
) -> None:
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise FieldError(name, f"must be an integer, got {type(value).__name__} {short(value)}")
    else:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise FieldError(name, f"must be a number, got {type(value).__name__} {short(value)}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise FieldError(name, f"must be a finite number, got {short(value)}")
    if not _within(value, limits):
        interval = _interval(limits)
        if tp is int:
            allowed = f"be an integer {interval}" + (" or none" if optional else "")
        elif interval.startswith("in "):
            allowed = f"lie {interval}" + (" or be none" if optional else "")
        else:
            allowed = f"be {interval}" + (" or none" if optional else "")
        raise FieldError(name, f"must {allowed}, got {short(value)}")


def _check_string(name: str, value: Any, limits: typing.Mapping[str, Any]) -> None:
    if not isinstance(value, str):
        raise FieldError(name, f"must be a string, got {type(value).__name__} {short(value)}")
    choices = limits.get("choices")
    if choices is not None and value not in choices:
        raise FieldError(name, f"must be one of {', '.join(choices)}, got {short(value)}")
    if "max_len" in limits and len(value) > limits["max_len"]:
        raise FieldError(name, f"must be at most {limits['max_len']} characters, got {len(value)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise FieldError(name, f"must not contain control characters, got {short(value)}")


def _within(value: float, limits: typing.Mapping[str, Any]) -> bool:
    return (
        ("ge" not in limits or value >= limits["ge"])
        and ("gt" not in limits or value > limits["gt"])
        and ("le" not in limits or value <= limits["le"])
        and ("lt" not in limits or value < limits["lt"])
    )


def _interval(limits: typing.Mapping[str, Any]) -> str:
    """`in [1, 4096]`, `in (0, 1)`, `> 0`, `>= 0`; '' when unbounded."""
    low = next(((b, limits[k]) for k, b in (("ge", "["), ("gt", "(")) if k in limits), None)
    high = next(((b, limits[k]) for k, b in (("le", "]"), ("lt", ")")) if k in limits), None)
    if low and high:
        return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return ""


def describe(tp: Any, limits: typing.Mapping[str, Any]) -> str:
    """What a field allows, in words: `an integer in [1, 4096]`, `a number > 0 or none`."""
    tp, optional = _strip_none(tp)
    none = " or none" if optional else ""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return f"one of {', '.join(map(str, typing.get_args(tp)))}{none}"
    if origin is tuple:
        item = (typing.get_args(tp) or (Any,))[0]
        longest = f", at most {limits['max_len']} entries" if "max_len" in limits else ""
        inner = {k: v for k, v in limits.items() if k != "max_len"}
        return f"a list (each {describe(item, inner)}{longest}){none}"
    bounds = _interval(limits)
    if tp is int:
        return f"an integer {bounds}".rstrip() + none
    if tp is float:
        return f"a number {bounds}".rstrip() + none
    if tp is bool:
        return "true or false"
    if tp is str:
        if "choices" in limits:
            return f"one of {', '.join(limits['choices'])}{none}"
        longest = f" of at most {limits['max_len']} characters" if "max_len" in limits else ""
        return f"a string{longest}{none}"
    return "any value" if tp is Any else "a table"


def short(value: Any, limit: int = 40) -> str:
    """`repr(value)`, cut to `limit` characters; a huge integer by its number of digits."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int((value.bit_length() - 1) * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _num(value: float) -> str:
    if abs(value) >= 10_000 and float(value).is_integer():
        return f"{int(value):_}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _strip_none(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) for `X | None` annotations."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else functools.reduce(operator.or_, args)), optional
    return tp, False


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)
