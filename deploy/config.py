"""The job's configuration: one frozen dataclass per component, composed into `JobConfig`.

Each component owns its config class next to its code (`actors.envs.EnvConfig`,
`actors.config.ActorConfig`, `learner.learner.LearnerConfig`, `replay.service.ReplayConfig`),
with neutral defaults; this module adds the deployment's sections (`RunConfig`,
`PolicyConfig`), composes them, loads TOML, applies `--set section.key=value` overrides, and
turns every problem into a `ConfigError` that names the key, before Ray starts. Each field
declares its doc and its allowed values once (`replay.fields.setting`); that is what `offpg
config --keys` prints.

A recipe (environment, budget, tuned hyperparameters) lives in exactly one place: its TOML file
under `deploy/configs/`, applied on top of the neutral defaults. With no file, `load_config`
(and so `offpg train`) uses `RECIPE`, the CartPole-v1 one.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from actors.config import ActorConfig
from actors.envs import EnvConfig, check_env_id
from deploy.controller import MAX_ACTORS
from learner.config import LearnerConfig
from learner.spec import CORES, NETWORKS
from replay.fields import FieldError, check, describe, setting, short
from replay.service import ReplayConfig
from replay.shards import shard_configs

#: The recipe `offpg train` runs without `--config`: CartPole-v1 to a mean return of 475.
RECIPE = Path(__file__).resolve().parent / "configs" / "cartpole.toml"
#: Keys that moved, and where to: an old file or `--set` gets told the new name.
MOVED = {
    "env.num_envs": "actors.num_envs",
    "actors.num_cpus": "run.actor_cpus",
    "actors.max_inflight": "run.actor_max_inflight",
}
#: Keys that are gone, and why: an old file or `--set` gets told.
REMOVED = {
    "actors.max_lag_timeout_s": "a weight sync returns the newest weights in one call, so an "
    "actor over actors.max_lag loads them at once and never waits",
}


class ConfigError(ValueError):
    """A configuration problem, with the dotted key it concerns. The CLI exits 2 on it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """The network: its shape is derived from the environment's spaces."""

    network: str = setting(
        "auto",
        "'auto' (CNN for image observations, else MLP), or the network by name",
        choices=("auto", *NETWORKS),
    )
    hidden_sizes: tuple[int, ...] = setting(
        (64, 64), "MLP hidden layer sizes", ge=1, le=16_384, max_len=16
    )
    core: str = setting(
        "none",
        "'none' (feed-forward) or 'lstm': a recurrent core between the torso and the heads, "
        "for partially observed tasks; the actors carry its state, the learner unrolls it",
        choices=CORES,
    )
    core_size: int = setting(128, "units of the recurrent core (core = lstm)", ge=1, le=16_384)

    def __post_init__(self) -> None:
        check(self)
        if not self.hidden_sizes:
            raise FieldError("hidden_sizes", "must list at least one layer")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What the job runs for, where it logs, and how its actors are placed on Ray."""

    name: str = setting(
        "",
        "run name; the logs go to <logdir>/<name> (default: env id + time)",
        max_len=128,
    )
    logdir: str = setting(
        "runs", "parent directory of the run directories (TensorBoard's logdir)", max_len=4096
    )
    num_actors: int = setting(1, "rollout actors to start", ge=0, le=MAX_ACTORS)
    actor_cpus: float = setting(
        1.0, "Ray CPUs reserved per rollout actor (fractional allowed, e.g. 0.5)", gt=0, le=1024
    )
    actor_max_inflight: int = setting(
        2,
        "fragment inserts in flight per actor; the actor blocks beyond it (backpressure)",
        ge=1,
        le=1024,
    )
    max_env_steps: int = setting(
        1_000_000, "stop after this many environment steps", ge=1, le=10**13
    )
    target_return: float | None = setting(
        None, "stop when the mean return of the last 100 episodes reaches this (none: never)"
    )
    log_every: float = setting(
        2.0,
        "seconds between progress lines, status updates and histograms (TensorBoard scalars "
        "come more often: about 2000 per env-step budget and at least one a second)",
        gt=0,
        le=3600,
    )
    num_cpus: int = setting(
        0,
        "logical CPUs of the embedded Ray (0: enough for every actor, the learners and the "
        "replay service, and at least the machine's cores)",
        ge=0,
        le=65_536,
    )
    address: str = setting(
        "", "Ray address to connect to ('' starts an embedded Ray)", max_len=1024
    )
    resume: bool = setting(False, "continue the run from its latest checkpoint and replay snapshot")
    dashboard: bool = setting(
        False,
        "start the Ray dashboard with the embedded Ray (web UI and state API on localhost:8265); "
        "offpg status | scale | stop do not need it",
    )

    def __post_init__(self) -> None:
        check(self)
        if any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise FieldError("name", f"must be a plain directory name, got {self.name!r}")


def _job_replay() -> ReplayConfig:
    """A job's replay service snapshots into its run directory (a relative snapshot_path is
    taken relative to it) every 15 s, so a restarted replay service or a resumed run loses at
    most that much of the actors' output; replay.snapshot_every = 0 turns the periodic ones
    off (the final one stays). That is how a job runs, not part of any recipe."""
    return ReplayConfig(snapshot_path="replay.snapshot", snapshot_every=15.0)


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything a training job needs; sections map to TOML tables. `JobConfig()` holds the
    neutral defaults; a recipe file says what differs (`load_config`)."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    actors: ActorConfig = dataclasses.field(default_factory=ActorConfig)
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)
    replay: ReplayConfig = dataclasses.field(default_factory=_job_replay)
    policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists), suitable for TOML, JSON and Ray."""
        return {
            section.name: _plain(dataclasses.asdict(getattr(self, section.name)))
            for section in dataclasses.fields(self)
        }

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


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
        raise ConfigError(_printable(text), "an override must look like section.key=value")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer too long to read
        value = raw
    return key, value


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    extra: Mapping[str, Any] | None = None,
    check_env: bool = True,
) -> JobConfig:
    """Compose a `JobConfig`: the neutral defaults, a recipe file (`RECIPE` when `path` is
    None), `--set` overrides and `extra`.

    Later sources win: file < overrides < extra (the CLI's named flags). Raises `ConfigError`
    naming the key for unknown sections or keys (with a did-you-mean), wrong types, values a
    component refuses, or an environment id that cannot be made.
    """
    tree: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, values in _read_toml(RECIPE if path is None else Path(path)).items():
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
    defaults = JobConfig()
    built = {
        section: _build(section, getattr(defaults, section), tree[section]) for section in SECTIONS
    }
    config = JobConfig(**built)
    _check_batch_fits(config)
    if check_env:
        try:
            check_env_id(config.env.id)
        except FieldError as exc:
            raise ConfigError(f"env.{exc.field}", exc.problem) from None
    return config


def _check_batch_fits(config: JobConfig) -> None:
    """A batch comes from one replay shard (`replay.shards`): it must fit in one."""
    replay, batch = config.replay, config.learner.batch_size
    per_shard = shard_configs(replay)[0].capacity_fragments
    if batch <= per_shard:
        return
    if replay.num_shards > 1:
        raise ConfigError(
            "replay.num_shards",
            f"is {replay.num_shards}: each shard holds {per_shard} fragments "
            f"(replay.capacity_fragments / num_shards), fewer than learner.batch_size {batch}, "
            "and a batch comes from one shard: it could never be served",
        )
    raise ConfigError(
        "learner.batch_size",
        f"is {batch}, above replay.capacity_fragments {per_shard}: it could never be served",
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("--config", f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc}") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer too long to read
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None


def _check_name(name: str, known: Mapping[str, Any], prefix: str) -> None:
    if name in known:
        return
    key = f"{prefix}{name}"
    if key in MOVED:
        raise ConfigError(key, f"has moved: set {MOVED[key]} instead")
    if key in REMOVED:
        raise ConfigError(key, f"was removed: {REMOVED[key]}")
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    raise ConfigError(_printable(key), f"unknown key{hint} (known: {', '.join(sorted(known))})")


def _printable(key: str) -> str:
    """`key` as given when it prints as one short line, else its cut-down repr."""
    return key if key.isprintable() and len(key) <= 64 else short(key)


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
    except FieldError as exc:
        raise ConfigError(f"{section}.{exc.field}", exc.problem) from None


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
            raise ConfigError(
                key, f"must be one of {', '.join(map(repr, allowed))}, got {short(value)}"
            )
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {type(value).__name__} {short(value)}")
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
        raise ConfigError(key, f"must be true or false, got {short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"must be an integer, got {type(value).__name__} {short(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(key, f"must be a finite number, got {short(value)}") from None
        raise ConfigError(key, f"must be a number, got {type(value).__name__} {short(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"must be a string, got {type(value).__name__} {short(value)}")
    return value


class KeyDoc(NamedTuple):
    """One row of `offpg config --keys`."""

    key: str  # section.name
    default: str  # the neutral default, as TOML
    value: str  # the value in the config asked about, as TOML
    allowed: str  # what the key accepts, in words
    doc: str


def field_docs(config: JobConfig | None = None) -> list[KeyDoc]:
    """Every key of every section: its neutral default, its value in `config` (default: the
    `RECIPE`), what it allows and what it means. The CLI's `--keys`."""
    defaults = JobConfig().to_dict()
    values = (config or load_config(None, check_env=False)).to_dict()
    rows = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                rows.append(
                    KeyDoc(
                        f"{section}.{f.name}",
                        _shown(defaults[section][f.name]),
                        _shown(values[section][f.name]),
                        describe(hints[f.name], f.metadata),
                        f.metadata.get("doc", ""),
                    )
                )
    return rows


def _shown(value: Any) -> str:
    return "none" if value is None else _toml_value(value)


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
    """`section.key=value` for every key of `config` that differs from the `RECIPE`: what
    `load_config(None, override_args(c))` turns back into `c` (how `offpg launch` ships a
    config to the cluster without its file: the cluster's `offpg train` starts from the same
    recipe, which travels with the code)."""
    defaults = load_config(None, check_env=False).to_dict()
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
