"""Data-parallel learners (`learner.num_learners`, issue 15): samples/s and where a step's time
goes with 1 and 2 learners, and env steps to the target on CartPole with 1 and 2.

1. Throughput. Each learner is its own process (torch.multiprocessing, one torch thread each, as
   a Ray learner with `num_cpus=1` gets), joined by a real gloo group over TCP on this machine
   (`learner.distributed.join`), stepping on synthetic batches of the same global size
   (`learner.batch_size` is the whole step's batch: with 2 learners each takes half). A step is
   split into data (numpy batch to tensors), the gradient all-reduce (`GradientSync`, waiting
   for the slower rank included) and compute (the rest of `Learner.step`: forward, loss,
   backward, clip, optimiser). Networks: the CartPole MLP at the recipe's batch (4 fragments x
   64 envs x 16 steps) and the IMPALA shallow CNN (84x84x4) at a small batch (`--cnn-batch`).
2. Sample efficiency. `offpg train` (the CartPole recipe on an embedded Ray) with
   `learner.num_learners` 1 and 2, same seed: env steps to a mean return of 475. Target: 2
   learners within 1.3x the env steps of 1.

    python benchmarks/learners.py [--steps 30] [--cnn-batch 8] [--cnn-unroll 20] [--no-train]

The last line is `LEARNERS {json}`. On a machine with GPUs, `--device cuda` times NCCL over
1 and `--world` GPUs (not measured yet: no GPU was lent when this was written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

NETWORKS = {
    # name: (PolicySpec kwargs, T, columns per fragment)
    "cartpole_mlp": (dict(obs_shape=(4,), obs_dtype="float32", action_dim=2), 16, 64),
    "impala_cnn": (
        dict(obs_shape=(4, 84, 84), obs_dtype="uint8", action_dim=6, network="impala_shallow"),
        20,
        1,
    ),
}


def _batch(spec_kwargs: dict, t: int, columns: int, seed: int):
    from replay.trajectory import Batch

    rng = np.random.default_rng(seed)
    shape = spec_kwargs["obs_shape"]
    if spec_kwargs["obs_dtype"] == "uint8":
        obs = rng.integers(0, 256, (t + 1, columns, *shape), dtype=np.uint8)
    else:
        obs = rng.standard_normal((t + 1, columns, *shape)).astype(np.float32)
    dim = spec_kwargs["action_dim"]
    return Batch(
        obs=obs,
        actions=rng.integers(0, dim, (t, columns)).astype(np.int64),
        rewards=rng.standard_normal((t, columns)).astype(np.float32),
        terminated=np.zeros((t, columns), bool),
        truncated=np.zeros((t, columns), bool),
        autoreset=np.zeros((t, columns), bool),
        behaviour_logp=np.full((t, columns), -np.log(dim), np.float32),
        core_state=np.zeros((2, columns, 0), np.float32),
        policy_version=np.zeros(columns, np.int64),
        actor_id=np.zeros(columns, np.int64),
        fragment_ids=tuple(str(i) for i in range(columns)),
    )


def _rank(rank: int, world: int, address: str, job: dict, out) -> None:
    """One learner process: join, align, step `job["steps"]` times, report rank 0's split."""
    torch.set_num_threads(1)
    from learner import distributed
    from learner.config import LearnerConfig
    from learner.learner import Learner
    from learner.prefetch import to_tensors
    from learner.spec import PolicySpec

    spec_kwargs, t, columns = NETWORKS[job["network"]]
    t = job.get("unroll") or t
    spec = PolicySpec(action_kind="discrete", **spec_kwargs)
    config = LearnerConfig(device=job["device"], batch_size=world, num_learners=world)
    if job["device"] == "cuda":
        torch.cuda.set_device(rank)  # one GPU per rank, as Ray gives each learner its own
    learner = Learner(spec, config)
    batch = _batch(spec_kwargs, t, columns * job["fragments"] // world, seed=rank)
    synced = [0.0]
    if world > 1:
        distributed.join(address, rank, world, learner.device, 60.0)
        all_reduce, broadcast = distributed.group_ops()
        distributed.align(learner.model, 0, None, broadcast)
        sync = distributed.GradientSync(all_reduce)

        def timed(params, stats):
            start = time.perf_counter()
            reduced = sync(params, stats)
            synced[0] += time.perf_counter() - start
            return reduced

        learner.sync = timed
    data = compute = 0.0
    for step in range(3 + job["steps"]):
        if step == 3:  # after the warm-up
            data = compute = synced[0] = 0.0
            start = time.perf_counter()
        t0 = time.perf_counter()
        tensors = to_tensors(batch, learner.device)
        t1 = time.perf_counter()
        learner.step(tensors)
        if learner.device.type == "cuda":
            torch.cuda.synchronize()
        data += t1 - t0
        compute += time.perf_counter() - t1
    elapsed = time.perf_counter() - start
    if rank == 0:
        steps = job["steps"]
        out.put(
            {
                "samples_per_s": steps * t * columns * job["fragments"] / elapsed,
                "ms_per_step": elapsed / steps * 1e3,
                "data_ms": data / steps * 1e3,
                "allreduce_ms": synced[0] / steps * 1e3,
                "compute_ms": (compute - synced[0]) / steps * 1e3,
            }
        )
    distributed.leave()


def throughput(
    network: str, world: int, fragments: int, steps: int, device: str, unroll: int = 0
) -> dict:
    from learner.distributed import free_address

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    job = {
        "network": network,
        "fragments": fragments,
        "steps": steps,
        "device": device,
        "unroll": unroll,
    }
    address = free_address("127.0.0.1")
    procs = [ctx.Process(target=_rank, args=(r, world, address, job, out)) for r in range(world)]
    for proc in procs:
        proc.start()
    result = out.get(timeout=600)
    for proc in procs:
        proc.join(60)
    _, t, columns = NETWORKS[network]
    t = unroll or t
    return {
        "network": network,
        "learners": world,
        "batch": f"{fragments * columns} x {t}",
        **result,
    }


def env_steps_to_target(learners: int, seed: int, logdir: str) -> dict:
    """One `offpg train` of the CartPole recipe with `learners` learners, to 475."""
    from deploy.config import load_config
    from deploy.job import train

    config = load_config(
        None,
        [f"learner.num_learners={learners}", f"env.seed={seed}", "run.max_env_steps=1500000"],
        extra={"run.logdir": logdir, "run.name": f"learners{learners}-seed{seed}"},
    )
    summary = train(config)
    return {
        "learners": learners,
        "seed": seed,
        "solved": summary.solved,
        "env_steps": summary.solved_at_env_steps,
        "wall_s": summary.solved_at_s,
        "learner_version": summary.learner_version,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    parser.add_argument("--cnn-batch", type=int, default=8, help="CNN fragments (x 20 steps)")
    parser.add_argument("--cnn-unroll", type=int, default=20, help="CNN steps per fragment")
    parser.add_argument("--world", type=int, default=2, help="learners of the second setting")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-train", action="store_true", help="skip the CartPole runs")
    parser.add_argument("--no-throughput", action="store_true", help="only the CartPole runs")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.1f} on {os.cpu_count()} CPUs", flush=True)
    rows = []
    settings = (("cartpole_mlp", 4), ("impala_cnn", args.cnn_batch))
    for network, fragments in () if args.no_throughput else settings:
        steps = args.steps if network == "cartpole_mlp" else max(args.steps // 3, 5)
        for world in (1, args.world):
            unroll = args.cnn_unroll if network == "impala_cnn" else 0
            row = throughput(network, world, fragments, steps, args.device, unroll)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| network | batch | learners | samples/s | efficiency | ms/step | data | "
        "all-reduce | compute |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for row in rows:
        one = next(r for r in rows if r["network"] == row["network"] and r["learners"] == 1)
        row["efficiency"] = row["samples_per_s"] / (row["learners"] * one["samples_per_s"])
        print(
            f"| {row['network']} | {row['batch']} | {row['learners']} | "
            f"{row['samples_per_s']:,.0f} | {row['efficiency']:.2f} | {row['ms_per_step']:.1f} | "
            f"{row['data_ms']:.1f} | {row['allreduce_ms']:.1f} | {row['compute_ms']:.1f} |"
        )
    runs = []
    if not args.no_train:
        with tempfile.TemporaryDirectory() as logdir:
            for learners in (1, args.world):
                runs.append(env_steps_to_target(learners, args.seed, logdir))
                print(json.dumps(runs[-1]), flush=True)
        if all(r["solved"] for r in runs):
            ratio = runs[1]["env_steps"] / runs[0]["env_steps"]
            print(f"\nenv steps to 475: {args.world} learners / 1 = {ratio:.2f} (target <= 1.3)")
    load_end = os.getloadavg()[0]
    print(f"load average at end: {load_end:.1f}")
    result = {"throughput": rows, "train": runs, "load": [load, load_end]}
    print("LEARNERS " + json.dumps(result))


if __name__ == "__main__":
    main()
