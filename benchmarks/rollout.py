"""Rollout speed on one core: raw vector-env stepping against `RolloutActor.collect()`.

    python benchmarks/rollout.py                      # CartPole-v1, num_envs 16/64/256, T=32
    python benchmarks/rollout.py --num-envs 64 128 --unroll 32 64 --seconds 5

Raw stepping is the vector env alone with pre-drawn random actions (no policy). The actor rate
is env steps per second of `collect()` with everything it does: batched inference on one torch
thread, buffer filling, episode statistics, `replay.codec.encode` (the sink discards the bytes).
Prints a Markdown table; `ratio` is actor rate / raw rate at the same `num_envs`. Rates are
the best of three windows (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.config import ActorConfig
from actors.envs import (
    EnvConfig,
    env_seeds,
    make_vec_env,
    policy_spec,
    probe_spaces,
    seeded_reset,
)
from actors.ports import LocalWeights
from actors.rollout import RolloutActor
from learner.policy import make_policy, state_dict_to_numpy

#: Each measurement is split into this many windows and the fastest is reported: the machine
#: is shared, and a window that another process interrupted says nothing about this code.
WINDOWS = 3


class NullSink:
    """Discards fragments: the benchmark measures the actor, not transport."""

    def put(self, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass


def raw_steps_per_s(env_id: str, num_envs: int, seconds: float) -> float:
    config = EnvConfig(id=env_id)
    env = make_vec_env(config, num_envs=num_envs, actor_id=0)
    seeded_reset(env, env_seeds(config, 0, num_envs=num_envs))
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(64)]

    def window() -> float:
        steps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / WINDOWS:
            for a in actions:
                env.step(a)
            steps += len(actions)
        return steps * num_envs / elapsed

    best = max(window() for _ in range(WINDOWS))
    env.close()
    return best


def actor_steps_per_s(env_id: str, num_envs: int, unroll: int, seconds: float) -> float:
    env_config = EnvConfig(id=env_id)
    spec = policy_spec(*probe_spaces(env_config))
    weights = LocalWeights(state_dict_to_numpy(make_policy(spec)))
    actor = RolloutActor(
        0,
        env_config,
        ActorConfig(num_envs=num_envs, unroll_length=unroll, torch_threads=1),
        spec,
        sink=NullSink(),
        weights=weights,
    )
    actor.collect()  # warm-up

    def window() -> float:
        steps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / WINDOWS:
            steps += actor.collect().rewards.size
        return steps / elapsed

    best = max(window() for _ in range(WINDOWS))
    actor.close()
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--unroll", type=int, nargs="+", default=[32])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{args.env}, one torch thread, best of {WINDOWS} windows in {args.seconds:g} s\n")
    print("| num_envs | unroll | raw env steps/s | actor env steps/s | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in args.num_envs:
        raw = raw_steps_per_s(args.env, n, args.seconds)
        for unroll in args.unroll:
            rate = actor_steps_per_s(args.env, n, unroll, args.seconds)
            print(f"| {n} | {unroll} | {raw:,.0f} | {rate:,.0f} | {rate / raw:.2f} |", flush=True)


if __name__ == "__main__":
    main()
