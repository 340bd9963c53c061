"""Config composition, TOML loading, overrides, and the errors that name the key."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

from deploy.cli import build_parser
from deploy.config import (
    RECIPE,
    SECTIONS,
    ConfigError,
    JobConfig,
    field_docs,
    load_config,
    override_args,
)
from deploy.controller import MAX_ACTORS
from deploy.launch import entrypoint

CONFIGS = sorted((Path(__file__).parent.parent / "deploy" / "configs").glob("*.toml"))


def _keys(*types: object) -> list[str]:
    """Every key whose annotation is one of `types` (or that type or None)."""
    keys = []
    for section, cls in SECTIONS.items():
        for name, tp in typing.get_type_hints(cls).items():
            if tp in types or tp in [t | None for t in types]:
                keys.append(f"{section}.{name}")
    return keys


FLOAT_KEYS = _keys(float)
INT_KEYS = _keys(int, tuple[int, ...])


def test_defaults_train_cartpole_to_475():
    config = load_config()
    assert config.env.id == "CartPole-v1"
    assert config.run.target_return == 475.0
    assert config == load_config(RECIPE)


def test_components_have_neutral_defaults_and_recipes_say_only_what_differs():
    neutral = JobConfig().to_dict()
    assert neutral["run"]["target_return"] is None
    assert neutral["learner"]["policy_clip"] is None and neutral["learner"]["reward_scale"] == 1
    assert neutral["replay"]["sampler"] == "fifo"
    for path in CONFIGS:
        for section, values in tomllib.loads(path.read_text()).items():
            for key, value in values.items():
                if (section, key) != ("env", "id"):
                    assert value != neutral[section][key], f"{path.name}: {section}.{key}"


def test_overrides_beat_file_and_flags_beat_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[learner]\nlr = 0.01\n[run]\nnum_actors = 3\n[env]\nid = "Acrobot-v1"\n')
    config = load_config(path, ["learner.lr=3e-4"], extra={"run.num_actors": 2})
    assert config.learner.lr == pytest.approx(3e-4)
    assert config.run.num_actors == 2
    assert config.env.id == "Acrobot-v1"


def test_int_is_accepted_for_float_and_lists_become_tuples():
    config = load_config(None, ["learner.lr=1", "policy.hidden_sizes=[32, 16]"])
    assert config.learner.lr == 1.0 and isinstance(config.learner.lr, float)
    assert config.policy.hidden_sizes == (32, 16)


def test_num_envs_is_one_key_of_the_actors():
    config = load_config(None, ["actors.num_envs=12"])
    assert config.actors.num_envs == 12
    assert "num_envs" not in config.to_dict()["env"]


def test_none_for_optional_fields():
    assert load_config(None, ["run.target_return=none"]).run.target_return is None


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["learner.lrr=1e-3"], "learner.lrr", "did you mean learner.lr?"),
        (["lerner.lr=1e-3"], "lerner", "did you mean learner?"),
        (["learner.lr=fast"], "learner.lr", "must be a number"),
        (["learner.lr=-1"], "learner.lr", ""),
        (["run.num_actors=1.5"], "run.num_actors", "must be an integer"),
        (["run.resume=1"], "run.resume", "true or false"),
        (["policy.network=transformer"], "policy.network", "must be one of"),
        (["learner.estimator=magic"], "learner.estimator", "vtrace"),
        (["env.id=NoSuchEnv-v9"], "env.id", "NoSuchEnv-v9"),
        (["learner"], "learner", "section.key=value"),
        (["env.num_envs=8"], "env.num_envs", "actors.num_envs"),
        (["actors.num_cpus=0.5"], "actors.num_cpus", "run.actor_cpus"),
        (["actors.max_inflight=4"], "actors.max_inflight", "run.actor_max_inflight"),
        (["actors.max_lag_timeout_s=5"], "actors.max_lag_timeout_s", "was removed"),
        (["replay.num_shards=0"], "replay.num_shards", "[1, 256]"),
        (["replay.capacity_fragments=8", "replay.num_shards=4"], "replay.num_shards", "one shard"),
        (["replay.capacity_fragments=2"], "learner.batch_size", "could never be served"),
        (["run.actor_cpus=0"], "run.actor_cpus", "in (0, 1024]"),
        (["run.actor_max_inflight=0"], "run.actor_max_inflight", "[1, 1024]"),
        (["learner=1"], "learner", "name a key"),
        (["replay.tolerance=2.0", "replay.samples_per_insert=8.0"], "replay.tolerance", "deadlock"),
        (["policy.hidden_sizes=[]"], "policy.hidden_sizes", "at least one"),
        (["run.num_actors=1e9"], "run.num_actors", f"[0, {MAX_ACTORS}]"),
        (["actors.num_envs=1e9"], "actors.num_envs", "1000000000"),
        (["policy.hidden_sizes=[64, 1e9]"], "policy.hidden_sizes[1]", "1000000000"),
        (["learner.prefetch=1e9"], "learner.prefetch", "[1, 64]"),
        (["run.log_every=1e9"], "run.log_every", "(0, 3600]"),
        (["env.id='.x:f'"], "env.id", "not a module name"),
        ([f"run.name='{'r' * 300}'"], "run.name", "at most 128 characters"),
        (['run.name="a\\u0000b"'], "run.name", "control characters"),
        (["run.name=../up"], "run.name", "plain directory name"),
        (['run.logdir="runs\\u0000x"'], "run.logdir", "control characters"),
        ([f"learner.lr={'9' * 400}"], "learner.lr", "finite"),
        ([f"run.num_actors={'9' * 400}"], "run.num_actors", "about 400 digits"),
        ([f"run.num_actors={'9' * 5000}"], "run.num_actors", "must be an integer"),
    ],
)
def test_bad_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert fragment in str(info.value)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "9" * 400])
def test_every_float_is_finite(key, value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={value}"])
    assert info.value.key == key
    assert "finite" in str(info.value)


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_size_has_an_upper_bound(key):
    section, name = key.split(".")
    field = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name]
    assert "le" in field.metadata, f"{key} declares no upper bound"
    too_big = field.metadata["le"] + 1
    value = f"[{too_big}]" if "hidden_sizes" in key else str(too_big)
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={value}"])
    assert info.value.key.startswith(key)
    assert str(field.metadata["le"]).replace("_", "") in str(info.value).replace("_", "")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[learner\nlr = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_round_trip_through_toml(tmp_path):
    config = load_config(None, ["learner.lr=0.002", "run.num_actors=4", "run.target_return=none"])
    path = tmp_path / "resolved.toml"
    path.write_text(config.to_toml())
    assert tomllib.loads(path.read_text())["learner"]["lr"] == 0.002
    assert load_config(path) == config


def test_every_field_is_documented():
    rows = field_docs()
    assert [row.key for row in rows if not row.doc.strip() or not row.allowed] == []
    by_key = {row.key: row for row in rows}
    # The neutral default, and the recipe's value next to it.
    assert (by_key["learner.lr"].default, by_key["learner.lr"].value) == ("0.0006", "0.001")
    assert by_key["run.num_actors"].allowed == f"an integer in [0, {MAX_ACTORS}]"


@pytest.mark.parametrize("path", [None, *CONFIGS], ids=["none"] + [p.stem for p in CONFIGS])
def test_launch_ships_a_config_as_overrides_that_round_trip(path):
    """`offpg launch` sends `offpg train --set ...` without the file: the cluster side, which
    starts from the same recipe, must rebuild exactly this config."""
    config = load_config(path, ["learner.lr=0.002", "env.kwargs={a = 1}"], check_env=False)
    assert load_config(None, override_args(config), check_env=False) == config
    argv = shlex.split(entrypoint(config))
    assert argv[:4] == ["python", "-m", "deploy.cli", "train"]
    args = build_parser().parse_args(argv[3:])
    assert load_config(args.config, args.overrides, check_env=False) == config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    config = load_config(path, check_env=not path.stem.startswith("pong"))
    assert isinstance(config, JobConfig)


def test_shipped_configs_cover_the_four_envs():
    assert {p.stem for p in CONFIGS} >= {"cartpole", "acrobot", "pendulum", "pong"}


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--set", "learner.lr=-1"], "learner.lr"),
        (["--set", "run.log_every=nan"], "run.log_every"),
        (["--set", f"replay.tolerance={'1' * 400}"], "replay.tolerance"),
        (["--env", ".x:f"], "env.id"),
        (["--name", "r" * 300], "run.name"),
        (["--actors", "1000000000"], "run.num_actors"),
        (["--target-return", "inf"], "run.target_return"),
    ],
    ids=["lr", "nan", "overflow", "env", "name", "actors", "target"],
)
def test_cli_bad_config_exits_2_before_ray_starts(tmp_path, args, key):
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "train", *args, "--logdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert key in result.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written for a bad config"


def test_launch_refuses_a_relative_logdir_before_submitting():
    """A relative run.logdir would land in the job's temporary working directory on the
    cluster; launch says so (exit 2) and never contacts the cluster at 127.0.0.1:1."""
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "launch", "--address", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "run.logdir: 'runs' is relative" in result.stderr


def test_cli_scale_refuses_an_absurd_actor_count_before_connecting():
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "scale", "somerun", "--actors", "1000000000"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"offpg: --actors must be in [0, {MAX_ACTORS}]"


def test_cli_keys_lists_every_key_with_default_and_recipe_value():
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "config", "--keys"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + len(field_docs())
    assert any(line.startswith("learner.lr = 0.0006 -> 0.001  (a number > 0)") for line in lines)
    assert any(line.startswith("learner.gamma = 0.99  (") for line in lines)


def test_cli_version_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.startswith("offpg ")
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--max-env-steps" in out.stdout
