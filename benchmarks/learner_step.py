"""Where a learner step's time goes on this CPU, and what a step costs with other settings.

Real CartPole fragments (one `RolloutActor` of the recipe, acting with the learner's initial
weights) are stacked into batches of the recipe's shape (`learner.batch_size` fragments of
`actors.num_envs` x `actors.unroll_length`), and a `Learner` of the recipe steps on them in
this process, publishing every step as the Ray job does (the weights copied to numpy and
pickled, which is what `ray.put` does with them). Printed:

- the profile of `--profile-steps` steps (cProfile on the process's CPU time, so other load on
  the machine does not count: cumulative CPU milliseconds of the calls that make up a step),
  with the recipe's settings;
- wall and CPU milliseconds per step for each torch thread count and batch size asked for
  (median of `--rounds` rounds of `--steps` steps each, interleaved, so load changes hit every
  setting), and sample rows per CPU second.

    python benchmarks/learner_step.py
    python benchmarks/learner_step.py --threads 1 2 --batch 4 8 --rounds 5

A Ray job's learner is one process with one CPU reserved (`num_cpus=1`, so Ray gives it one
OpenMP thread unless `learner.torch_threads` says otherwise), next to the rollout actors; on the
2-core dev machine a second thread competes with them. The last line is `LEARNER-STEP {json}`.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pickle
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from actors.ports import LocalWeights, MemorySink  # noqa: E402
from actors.rollout import RolloutActor  # noqa: E402
from deploy.config import JobConfig, load_config  # noqa: E402
from deploy.specs import job_policy_spec  # noqa: E402
from learner.learner import Learner  # noqa: E402
from learner.policy import state_dict_to_numpy  # noqa: E402
from replay.codec import decode  # noqa: E402
from replay.trajectory import Batch  # noqa: E402

#: The calls of a step shown in the profile, in the order a step makes them.
PROFILED = (
    ("to_tensors", "numpy batch to tensors"),
    ("evaluate", "network forward (policy and value)"),
    ("loss_terms", "loss: inputs, V-trace, surrogate, terms"),
    ("vtrace", "  of which V-trace"),
    ("backward", "backward"),
    ("clip_grad_norm_", "gradient norm clipping"),
    ("importance_stats", "importance statistics"),
    ("<method 'tolist' of 'torch._C.TensorBase' objects>", "scalars read back"),
    ("step", "optimiser step (Adam)"),
    ("publish_weights", "publish: weights to numpy, pickled"),
)


def fragments(config: JobConfig, count: int) -> list:
    """`count` fragments of the recipe, acted by a fresh network."""
    spec = job_policy_spec(config)
    learner = Learner(spec, config.learner)
    sink = MemorySink()
    actor = RolloutActor(
        0,
        config.env,
        config.actors,
        spec,
        sink=sink,
        weights=LocalWeights(state_dict_to_numpy(learner.model)),
    )
    try:
        while len(sink.items) < count:
            actor.collect()
    finally:
        actor.close()
    return [decode(data) for data in sink.items[:count]]


def make_learner(config: JobConfig, batch_size: int, threads: int) -> Learner:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    learner_config = dataclasses.replace(config.learner, batch_size=batch_size)

    def publish(version: int, weights: dict) -> None:
        pickle.dumps((version, weights), protocol=5)

    return Learner(job_policy_spec(config), learner_config, publish=publish)


def batches(frags: list, batch_size: int) -> list[Batch]:
    """Every run of `batch_size` consecutive fragments, cycled (at least one batch)."""
    out = []
    for start in range(0, len(frags), batch_size):
        chunk = (frags[start:] + frags)[:batch_size]
        out.append(Batch.stack(chunk))
    return out


def timed(learner: Learner, data: list[Batch], steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step over `steps` steps (tensors made inside the step, as
    `Learner.step` does for a numpy batch; in a Ray job the prefetch thread makes them beside
    the step). CPU is the process's, all its threads."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        learner.step(data[i % len(data)])
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def profile(config: JobConfig, frags: list, steps: int) -> dict[str, float]:
    """CPU milliseconds per step of each call in `PROFILED`, with the recipe's batch, one
    thread."""
    learner = make_learner(config, config.learner.batch_size, 1)
    data = batches(frags, config.learner.batch_size)
    timed(learner, data, 5)  # warm-up
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    _, cpu = timed(learner, data, steps)
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    out = {"step (profiled)": cpu * 1000}
    for name, label in PROFILED:
        cumulative = sum(v[3] for k, v in stats.items() if k[2] == name and _ours(k, name))
        out[label] = cumulative / steps * 1000
    return out


def _ours(key: tuple, name: str) -> bool:
    """The call `name` of a step: `step` is the optimiser's (torch/optim), not `Learner.step`;
    `backward` torch's own."""
    path = key[0]
    if name == "step":
        return "optim" in path
    if name == "backward":
        return "_tensor.py" in path
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="fragments per batch")
    parser.add_argument("--steps", type=int, default=40, help="steps per round and setting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=40)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    config = load_config(None, args.overrides)
    sizes = args.batch or [config.learner.batch_size]
    frags = fragments(config, 2 * max(sizes))
    rows_per_fragment = config.actors.num_envs * config.actors.unroll_length
    print(
        f"CartPole recipe: {rows_per_fragment} rows per fragment, batch "
        f"{config.learner.batch_size}; load {os.getloadavg()[0]:.2f}; torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs\n"
    )

    prof = profile(config, frags, args.profile_steps)
    print("| part of a step (batch of the recipe, 1 thread) | CPU ms per step |")
    print("| --- | ---: |")
    for label, ms in prof.items():
        print(f"| {label} | {ms:.2f} |")

    settings = [(t, b) for b in sizes for t in args.threads]
    learners = {s: make_learner(config, s[1], s[0]) for s in settings}
    data = {b: batches(frags, b) for b in sizes}
    per_step: dict[tuple[int, int], list[tuple[float, float]]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for threads, size in settings:
            torch.set_num_threads(threads)
            timed(learners[threads, size], data[size], 3)  # warm-up after the switch
            per_step[threads, size].append(timed(learners[threads, size], data[size], args.steps))
    print(
        "\n| torch threads | batch (fragments) | wall ms per step | CPU ms per step "
        "| sample rows per CPU s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: |")
    results = []
    for (threads, size), values in per_step.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        rows = size * rows_per_fragment / cpu
        print(f"| {threads} | {size} | {wall * 1000:.1f} | {cpu * 1000:.1f} | {rows:,.0f} |")
        results.append(
            {"threads": threads, "batch": size, "wall_ms": wall * 1000, "cpu_ms": cpu * 1000}
        )
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    print("LEARNER-STEP " + json.dumps({"profile_ms": prof, "settings": results}))


if __name__ == "__main__":
    main()
