"""Atari Pong speed: raw ALE stepping, the actors' stepping with inference, end to end, and the
learner's samples/s on a GPU.

    python benchmarks/pong.py                                  # CPU parts, here (atari extra)
    python benchmarks/pong.py --learner-only --device cuda --json out.json   # on a GPU machine
    python benchmarks/pong.py --gpu-json benchmarks/results/pong_gpu.json    # CPU parts + GPU table

ALE/Pong-v5 with offpg's preprocessing (`actors.envs.make_vec_env`: frame skip 4, 84x84 grey,
4 stacked frames). Rates are env steps per second (one agent step = 4 emulator frames, so
frames/s = 4 x env steps/s), all with `num_envs` envs per process:

- raw: the vector env alone, random actions, in 1 and in 2 processes (the machine's cores);
- actor: `RolloutActor.collect()` (IMPALA shallow CNN inference on one torch thread, fragment
  building, msgpack encoding; the bytes are discarded), in 1 and 2 processes. Target: at least
  50% of raw on the same cores;
- end to end: `offpg train --config deploy/configs/pong.toml` with 1 and 2 actors, the learner on
  this machine's CPU, for a fixed env-step budget; the rate is the median of the job's own
  `throughput/env_steps_per_s` points after the first, and the overall steps / wall time;
- learner (`--learner-only`, no Gymnasium or ALE import: the `PolicySpec` is built directly):
  `Learner.run` samples/s (real steps trained on per second, host-to-device copies overlapped by
  its prefetch thread) for batch sizes 32-256 (env columns) x unroll 20-80, on synthetic
  batches; and from it, how many actor cores (at the measured actor rate per core) one learner
  keeps up with when every sample is learned from once (fifo, as pong.toml).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
ENV_ID = "ALE/Pong-v5"
FRAME_SKIP = 4
WINDOWS = 3


class NullSink:
    def put(self, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass


def _raw(args: tuple[int, float, int]) -> float:
    num_envs, seconds, actor_id = args
    from actors.envs import EnvConfig, env_seeds, make_vec_env, seeded_reset

    config = EnvConfig(id=ENV_ID)
    env = make_vec_env(config, num_envs=num_envs, actor_id=actor_id)
    seeded_reset(env, env_seeds(config, actor_id, num_envs=num_envs))
    env.action_space.seed(actor_id)
    actions = [env.action_space.sample() for _ in range(32)]
    for a in actions[:8]:
        env.step(a)
    best = 0.0
    for _ in range(WINDOWS):
        steps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / WINDOWS:
            for a in actions:
                env.step(a)
            steps += len(actions) * num_envs
        best = max(best, steps / elapsed)
    env.close()
    return best


def _actor(args: tuple[int, int, float, int]) -> float:
    num_envs, unroll, seconds, actor_id = args
    import torch

    from actors.config import ActorConfig
    from actors.envs import EnvConfig, policy_spec, probe_spaces
    from actors.ports import LocalWeights
    from actors.rollout import RolloutActor
    from learner.policy import make_policy, state_dict_to_numpy

    torch.set_num_threads(1)
    env_config = EnvConfig(id=ENV_ID)
    spec = policy_spec(*probe_spaces(env_config))
    actor = RolloutActor(
        actor_id,
        env_config,
        ActorConfig(num_envs=num_envs, unroll_length=unroll),
        spec,
        sink=NullSink(),
        weights=LocalWeights(state_dict_to_numpy(make_policy(spec))),
    )
    actor.collect()
    best = 0.0
    for _ in range(WINDOWS):
        steps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / WINDOWS:
            steps += actor.collect().rewards.size
        best = max(best, steps / elapsed)
    actor.close()
    return best


def fragment_bytes(num_envs: int, unroll: int) -> tuple[int, int, int]:
    """Encoded bytes of one real Pong fragment, each frame once (as sent), and of the same
    fragment with every stacked frame repeated (`[T+1, N, 4, 84, 84]`, as before schema 2);
    and how many stacks it carries whole (episode resets)."""
    import dataclasses

    from actors.config import ActorConfig
    from actors.envs import EnvConfig, policy_spec, probe_spaces
    from actors.ports import LocalWeights
    from actors.rollout import RolloutActor
    from learner.policy import make_policy, state_dict_to_numpy
    from replay.codec import encode

    env_config = EnvConfig(id=ENV_ID)
    spec = policy_spec(*probe_spaces(env_config))
    actor = RolloutActor(
        0,
        env_config,
        ActorConfig(num_envs=num_envs, unroll_length=unroll),
        spec,
        sink=NullSink(),
        weights=LocalWeights(state_dict_to_numpy(make_policy(spec))),
    )
    frag = actor.collect()
    actor.close()
    repeated = dataclasses.replace(
        frag, obs=frag.stacked_obs(), frame_stack=1, stack_resets=None, stack_heads=None
    )
    return len(encode(frag)), len(encode(repeated)), len(frag.stack_resets)


def in_processes(fn, args: list[tuple]) -> float:
    """Sum of `fn(args[i])` run in len(args) processes at once."""
    with multiprocessing.get_context("spawn").Pool(len(args)) as pool:
        return float(sum(pool.map(fn, args)))


def end_to_end(actors: int, budget: int) -> dict:
    from deploy import metrics as tags
    from deploy.config import load_config
    from deploy.job import train
    from deploy.plot import read_scalar

    logdir = tempfile.mkdtemp(prefix="offpg-pong-")
    config = load_config(
        Path(__file__).resolve().parent.parent / "deploy/configs/pong.toml",
        ["run.target_return=none", "run.log_every=5.0", "learner.device=cpu"],
        extra={
            "run.num_actors": actors,
            "run.max_env_steps": budget,
            "run.logdir": logdir,
            "run.name": f"pong-{actors}",
        },
    )
    summary = train(config)
    rates = read_scalar(summary.run_dir, tags.ENV_STEPS_PER_S).values
    steady = float(statistics.median(rates[1:])) if len(rates) > 1 else float("nan")
    samples = read_scalar(summary.run_dir, tags.LEARNER_SAMPLES_PER_S).values
    return {
        "actors": actors,
        "env_steps": summary.env_steps,
        "wall_s": summary.wall_s,
        "overall": summary.env_steps / summary.wall_s,
        "steady": steady,
        "learner_samples_per_s": float(statistics.median(samples[1:])) if len(samples) > 1 else 0,
    }


def learner_rates(
    device: str, batch_sizes: list[int], unrolls: list[int], steps: int, threads: int
) -> list[dict]:
    """`Learner.run` samples/s on synthetic Pong batches (no Gymnasium import)."""
    import torch

    from learner.learner import Learner, LearnerConfig
    from learner.policy import PolicySpec
    from replay.trajectory import Batch

    if threads:
        torch.set_num_threads(threads)
    spec = PolicySpec(
        obs_shape=(4, 84, 84),
        obs_dtype="uint8",
        action_kind="discrete",
        action_dim=6,
        network="impala_shallow",
    )
    rng = np.random.default_rng(0)
    out = []
    for b in batch_sizes:
        for t in unrolls:
            batch = Batch(
                obs=rng.integers(0, 256, (t + 1, b, 4, 84, 84), dtype=np.uint8),
                actions=rng.integers(0, 6, (t, b)).astype(np.int64),
                rewards=rng.choice([-1.0, 0.0, 1.0], (t, b), p=[0.01, 0.98, 0.01]).astype(
                    np.float32
                ),
                terminated=np.zeros((t, b), bool),
                truncated=np.zeros((t, b), bool),
                autoreset=np.zeros((t, b), bool),
                behaviour_logp=np.full((t, b), -np.log(6), np.float32),
                core_state=np.zeros((2, b, 0), np.float32),
                policy_version=np.zeros(b, np.int64),
                actor_id=np.zeros(b, np.int64),
                fragment_ids=tuple(str(i) for i in range(b)),
            )
            learner = Learner(
                spec,
                LearnerConfig(
                    device=device, optimizer="rmsprop", lr=6e-4, max_grad_norm=40.0, batch_size=1
                ),
            )
            learner.run([batch] * 3)  # warm-up: cuDNN autotuning, allocator
            if learner.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            learner.run([batch] * steps)
            if learner.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            rate = steps * b * t / elapsed
            name = torch.cuda.get_device_name() if learner.device.type == "cuda" else "cpu"
            out.append({"batch": b, "unroll": t, "samples_per_s": rate, "device": name})
            print(f"learner {name}: batch {b:3} x unroll {t:2}: {rate:,.0f} samples/s", flush=True)
            del learner
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", type=int, default=16, help="envs per process (pong.toml)")
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=6.0, help="per raw/actor measurement")
    parser.add_argument("--e2e-steps", type=int, default=40_000, help="env steps per e2e run")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--learner-only", action="store_true", help="only the learner table")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--unrolls", type=int, nargs="+", default=[20, 40, 80])
    parser.add_argument("--learner-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="learner torch threads (0: auto)")
    parser.add_argument("--json", help="write the learner rates here (with --learner-only)")
    parser.add_argument("--gpu-json", help="learner rates measured on a GPU, to report")
    args = parser.parse_args(argv)

    if args.learner_only:
        rates = learner_rates(
            args.device, args.batch_sizes, args.unrolls, args.learner_steps, args.threads
        )
        if args.json:
            Path(args.json).write_text(json.dumps(rates, indent=1))
        return

    load = os.getloadavg()[0]
    n, t, s = args.num_envs, args.unroll, args.seconds
    packed, repeated, resets = fragment_bytes(n, t)
    raw1 = in_processes(_raw, [(n, s, 0)])
    raw2 = in_processes(_raw, [(n, s, 0), (n, s, 1)])
    act1 = in_processes(_actor, [(n, t, s, 0)])
    act2 = in_processes(_actor, [(n, t, s, 0), (n, t, s, 1)])
    lines = [
        "# Atari Pong speed",
        "",
        f"`python benchmarks/pong.py` on {os.cpu_count()} shared cores, "
        f"{time.strftime('%Y-%m-%d')}, load {load:.1f} at the start; {ENV_ID}, {n} envs per "
        f"process, unroll {t}; env steps/s (frames/s = {FRAME_SKIP} x), best of {WINDOWS} "
        "windows.",
        "",
        "| processes | raw ALE env steps/s | actor env steps/s (with inference) | actor / raw |",
        "| ---: | ---: | ---: | ---: |",
        f"| 1 | {raw1:,.0f} | {act1:,.0f} | {act1 / raw1:.2f} |",
        f"| 2 | {raw2:,.0f} | {act2:,.0f} | {act2 / raw2:.2f} |",
        "",
        f"Target actor >= 50% of raw: **{'met' if act1 / raw1 >= 0.5 else 'MISSED'}** on one "
        f"core ({act1 / raw1:.0%}), **{'met' if act2 / raw2 >= 0.5 else 'MISSED'}** on two "
        f"({act2 / raw2:.0%}).",
        "",
        f"A {t} x {n} fragment encoded: {packed:,} bytes with each frame once "
        f"({resets} stack(s) sent whole after an episode reset), {repeated:,} bytes with every "
        f"stacked frame repeated as before schema 2: **{repeated / packed:.3f}x smaller** "
        f"(the bound for 4 stacked frames is (T+1) x 4 / (T+4) = {(t + 1) * 4 / (t + 4):.3f}x).",
    ]
    print("\n".join(lines), flush=True)
    if not args.skip_e2e:
        lines += [
            "",
            f"End to end (`offpg train --config deploy/configs/pong.toml`, learner on this CPU, "
            f"{args.e2e_steps:,} env steps per run):",
            "",
            "| actors | env steps/s steady | env steps/s overall (start-up included) | "
            "learner samples/s | vs raw on 2 processes |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for actors in (1, 2):
            r = end_to_end(actors, args.e2e_steps)
            lines.append(
                f"| {actors} | {r['steady']:,.0f} | {r['overall']:,.0f} | "
                f"{r['learner_samples_per_s']:,.0f} | {r['steady'] / raw2:.2f} |"
            )
            print(lines[-1], flush=True)
    if args.gpu_json:
        rates = json.loads(Path(args.gpu_json).read_text())
        per_core = act1
        unrolls = sorted({r["unroll"] for r in rates})
        lines += [
            "",
            f"Learner on {rates[0]['device']} (`--learner-only --device cuda`, synthetic "
            f"batches, IMPALA shallow CNN, RMSprop): samples/s, and the actor cores it keeps up "
            f"with at {per_core:,.0f} env steps/s per actor core (measured above), each sample "
            "learned from once:",
            "",
            "| batch \\ unroll | " + " | ".join(str(u) for u in unrolls) + " |",
            "| ---: |" + " ---: |" * len(unrolls),
        ]
        for b in sorted({r["batch"] for r in rates}):
            cells = [
                f"{r['samples_per_s']:,.0f} ({r['samples_per_s'] / per_core:.0f} cores)"
                for r in sorted(rates, key=lambda r: r["unroll"])
                if r["batch"] == b
            ]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        best = max(rates, key=lambda r: r["samples_per_s"])
        lines += [
            "",
            f"Best: batch {best['batch']} x unroll {best['unroll']}, "
            f"{best['samples_per_s']:,.0f} samples/s: one GPU learner keeps up with about "
            f"**{best['samples_per_s'] / per_core:.0f} actor cores** of this machine's kind.",
        ]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pong.md").write_text(text)
    print("\n" + text + f"\nwrote {RESULTS / 'pong.md'}")


if __name__ == "__main__":
    main()
