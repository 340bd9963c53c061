"""The job's configuration: one frozen dataclass per component, composed into `JobConfig`.

Each component owns its config class next to its code (`actors.envs.EnvConfig`,
`actors.rollout.ActorConfig`, `learner.learner.LearnerConfig`, `replay.service.ReplayConfig`);
this module composes them, loads TOML, applies `--set section.key=value` overrides, and turns
every problem into a `ConfigError` that names the key, before Ray starts. Field documentation
lives in each field's `metadata["doc"]` and is what `offpg config --keys` prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from actors.envs import EnvConfig, check_env_id
from actors.rollout import ActorConfig
from learner.learner import LearnerConfig
from replay.service import ReplayConfig


class ConfigError(ValueError):
    """A configuration problem, with the dotted key it concerns. The CLI exits 2 on it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def _doc(default: Any, text: str) -> Any:
    return dataclasses.field(default=default, metadata={"doc": text})


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """The network: its shape is derived from the environment's spaces."""

    network: str = _doc(
        "auto",
        "'auto' (CNN for image observations, else MLP), 'mlp', 'impala_shallow' or 'impala_deep'",
    )
    hidden_sizes: tuple[int, ...] = _doc((64, 64), "MLP hidden layer sizes")

    def __post_init__(self) -> None:
        allowed = ("auto", "mlp", "impala_shallow", "impala_deep")
        if self.network not in allowed:
            raise ValueError(f"network: must be one of {', '.join(allowed)}, got {self.network!r}")
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes: must be positive sizes, got {self.hidden_sizes}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What the job runs for, where it logs, and how many actors it starts."""

    name: str = _doc("", "run name; the logs go to <logdir>/<name> (default: env id + time)")
    logdir: str = _doc("runs", "parent directory of the run directories (TensorBoard's logdir)")
    num_actors: int = _doc(1, "rollout actors to start")
    max_env_steps: int = _doc(2_000_000, "stop after this many environment steps")
    target_return: float | None = _doc(
        475.0, "stop when the mean return of the last 100 episodes reaches this (none: never)"
    )
    log_every: float = _doc(2.0, "seconds between TensorBoard points and progress lines")
    num_cpus: int = _doc(
        0,
        "logical CPUs of the embedded Ray (0: enough for every actor, the learner and the "
        "replay service, and at least the machine's cores)",
    )
    address: str = _doc("", "Ray address to connect to ('' starts an embedded Ray)")
    resume: bool = _doc(False, "continue the run from its latest checkpoint and replay snapshot")

    def __post_init__(self) -> None:
        if self.num_actors < 0:
            raise ValueError(f"num_actors: must be >= 0, got {self.num_actors}")
        if self.max_env_steps < 1:
            raise ValueError(f"max_env_steps: must be >= 1, got {self.max_env_steps}")
        if self.log_every <= 0:
            raise ValueError(f"log_every: must be > 0 seconds, got {self.log_every}")
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus: must be >= 0, got {self.num_cpus}")
        if "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name: must be a plain directory name, got {self.name!r}")


# The job's defaults are the tuned CartPole-v1 recipe (`offpg train` with no arguments solves
# it; deploy/configs/cartpole.toml spells the same values out). Uniform replay at ~8 samples per
# inserted fragment, importance-corrected by V-trace inside APPO's clipped surrogate, gives
# PPO-like sample efficiency at the actors' throughput. Files and `--set` overrides apply on
# top of these.
def _default_actors() -> ActorConfig:
    return ActorConfig(num_envs=64, unroll_length=16)


def _default_learner() -> LearnerConfig:
    # reward_scale 0.1: CartPole's discounted returns reach ~100, and a value head learning at
    # Adam's lr took ~1M env steps to grow that large, holding the return near 200 meanwhile.
    # policy_clip 0.2 (APPO's trust region): each fragment is replayed ~8 times at a policy lag
    # of ~40 versions; without it the policy ran away from the data (importance ESS fell to
    # 0.1) and collapsed to a deterministic one (return ~9) on some seeds. With both, lr 6e-4
    # solved 12 of 12 seeds at 0.27-0.37M env steps (1-2M without), and lr 1e-3 12 of 12 at
    # 0.20-0.30M.
    return LearnerConfig(
        lr=1e-3, batch_size=4, max_grad_norm=1.0, reward_scale=0.1, policy_clip=0.2
    )


def _default_replay() -> ReplayConfig:
    # Snapshots every 15 s into the run directory (a relative snapshot_path is taken relative to
    # it): a restarted replay service or a resumed run loses at most that much of the actors'
    # output. replay.snapshot_every=0 turns the periodic ones off (the final one stays).
    return ReplayConfig(
        sampler="uniform",
        capacity_fragments=32,
        samples_per_insert=8.0,
        tolerance=64.0,
        snapshot_path="replay.snapshot",
        snapshot_every=15.0,
    )


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything a training job needs; sections map to TOML tables."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    actors: ActorConfig = dataclasses.field(default_factory=_default_actors)
    learner: LearnerConfig = dataclasses.field(default_factory=_default_learner)
    replay: ReplayConfig = dataclasses.field(default_factory=_default_replay)
    policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        # One source of truth for keys two components share (see DERIVED).
        if self.env.num_envs != self.actors.num_envs:
            env = dataclasses.replace(self.env, num_envs=self.actors.num_envs)
            object.__setattr__(self, "env", env)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists), suitable for TOML, JSON and Ray; keys derived
        from another key (DERIVED) are left out."""
        tree = {
            section.name: _plain(dataclasses.asdict(getattr(self, section.name)))
            for section in dataclasses.fields(self)
        }
        for key in DERIVED:
            section, _, name = key.partition(".")
            del tree[section][name]
        return tree

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


#: Keys a job derives from another key: an actor's vector env has `actors.num_envs` envs.
DERIVED: dict[str, str] = {"env.num_envs": "actors.num_envs"}

#: section name -> its config class, in `JobConfig` order.
SECTIONS: dict[str, type] = typing.get_type_hints(JobConfig)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (`section.key`, value); the value is read as TOML, else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "an override must look like section.key=value")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    extra: Mapping[str, Any] | None = None,
    check_env: bool = True,
) -> JobConfig:
    """Compose a `JobConfig` from defaults, a TOML file, `--set` overrides and `extra`.

    Later sources win: file < overrides < extra (the CLI's named flags). Raises `ConfigError`
    naming the key for unknown sections or keys (with a did-you-mean), wrong types, values a
    component refuses, or an environment id that cannot be made.
    """
    tree: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
        for section, values in data.items():
            _check_name(section, SECTIONS, "")
            if not isinstance(values, dict):
                raise ConfigError(section, "must be a TOML table of keys")
            tree[section].update(values)
    flat = [parse_override(o) for o in overrides]
    flat += list((extra or {}).items())
    for key, value in flat:
        section, _, name = key.partition(".")
        _check_name(section, SECTIONS, "")
        if not name:
            raise ConfigError(key, "name a key inside the section, e.g. learner.lr=3e-4")
        tree[section][name] = value
    for key, source in DERIVED.items():
        section, _, name = key.partition(".")
        if name in tree[section]:
            raise ConfigError(key, f"is set by {source} in a job; set that instead")
    defaults = JobConfig()
    built = {
        section: _build(section, getattr(defaults, section), tree[section]) for section in SECTIONS
    }
    config = JobConfig(**built)
    if check_env:
        try:
            check_env_id(config.env.id)
        except (ValueError, ImportError) as exc:
            raise ConfigError("env.id", str(exc)) from None
    return config


def _check_name(name: str, known: Mapping[str, Any], prefix: str) -> None:
    if name in known:
        return
    key = f"{prefix}{name}"
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    raise ConfigError(key, f"unknown key{hint} (known: {', '.join(sorted(known))})")


def _build(section: str, base: Any, values: Mapping[str, Any]) -> Any:
    """`base` (the section's default) with `values` applied, type-checked and validated."""
    cls = type(base)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in values.items():
        _check_name(name, fields, f"{section}.")
        kwargs[name] = _coerce(value, hints[name], f"{section}.{name}")
    try:
        return dataclasses.replace(base, **kwargs)
    except (ValueError, TypeError) as exc:
        # Components start their messages with the field's name ("lr: must be ...",
        # "tolerance is 0: ..."): that names the key.
        message = str(exc)
        match = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*:?\s*(.*)", message, re.DOTALL)
        if match and match.group(1) in fields:
            name, rest = match.groups()
            if not message.startswith(f"{name}:"):
                rest = message  # "tolerance is 0: ..." reads better whole
            raise ConfigError(f"{section}.{name}", rest) from None
        raise ConfigError(section, message) from None


_NONE_WORDS = ("none", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert a TOML value to a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS)
        ):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc).partition(": ")[2])
        raise ConfigError(key, " or ".join(errors))
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a table, got {type(value).__name__}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"must be an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"must be a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"must be a string, got {type(value).__name__} {value!r}")
    return value


def field_docs() -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field of every section: the CLI's field help."""
    rows = []
    defaults = JobConfig().to_dict()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.init and f"{section}.{f.name}" not in DERIVED:
                default = defaults[section][f.name]
                rows.append((f"{section}.{f.name}", repr(default), f.metadata.get("doc", "")))
    return rows


def dumps_toml(tree: Mapping[str, Mapping[str, Any]]) -> str:
    """A minimal TOML writer for the two-level config tree. TOML has no null, so None is
    written as the string "none", which optional fields read back as None."""
    lines: list[str] = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def override_args(config: JobConfig) -> list[str]:
    """`section.key=value` for every key of `config` that differs from the defaults: what
    `load_config(None, override_args(c))` turns back into `c` (how `offpg launch` ships a
    config to the cluster without its file)."""
    defaults = JobConfig().to_dict()
    return [
        f"{section}.{key}={_toml_value(value)}"
        for section, values in config.to_dict().items()
        for key, value in values.items()
        if value != defaults[section][key]
    ]


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def die(error: ConfigError) -> typing.NoReturn:
    """Print one line naming the key and exit with status 2 (bad configuration)."""
    print(f"offpg: config error: {error}", file=sys.stderr)
    raise SystemExit(2)
