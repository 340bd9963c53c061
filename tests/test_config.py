"""Config composition, TOML loading, overrides, and the errors that name the key."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from deploy.config import ConfigError, JobConfig, field_docs, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "deploy" / "configs").glob("*.toml"))


def test_defaults_train_cartpole_to_475():
    config = load_config()
    assert config.env.id == "CartPole-v1"
    assert config.run.target_return == 475.0


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


def test_env_num_envs_follows_actors_num_envs():
    config = load_config(None, ["actors.num_envs=12"])
    assert config.env.num_envs == config.actors.num_envs == 12
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
        (["learner=1"], "learner", "name a key"),
    ],
)
def test_bad_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert fragment in str(info.value)


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
    undocumented = [key for key, _, doc in field_docs() if not doc.strip()]
    assert undocumented == []


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    config = load_config(path, check_env=not path.stem.startswith("pong"))
    assert isinstance(config, JobConfig)


def test_shipped_configs_cover_the_four_envs():
    assert {p.stem for p in CONFIGS} >= {"cartpole", "acrobot", "pendulum", "pong"}


def test_cli_bad_config_exits_2_before_ray_starts(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "train",
            "--set",
            "learner.lr=-1",
            "--logdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "learner.lr" in result.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written for a bad config"


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
