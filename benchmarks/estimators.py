"""Time per call of the estimators in `learner/estimators.py`, printed as a Markdown table.

    python benchmarks/estimators.py                      # CPU, T=100, B=1024, float32
    python benchmarks/estimators.py --device cuda        # on a GPU
    python benchmarks/estimators.py --T 80 --B 4096 --dtype float64 --threads 1

Each row is the median (and the fastest) of `--repeats` timed calls after `--warmup` untimed
ones; input validation is included, since the learner pays for it on every step. On CUDA every
call is followed by a synchronize, so the time is the call's full latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from learner import estimators as est
except ImportError:  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from learner import estimators as est


def make_inputs(T: int, B: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Random inputs shaped like a learner batch, with ~1% of steps ending an episode."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    done = torch.rand(T, B, generator=gen) < 0.01
    inputs = {
        "rewards": randn(T, B),
        "discounts": 0.99 * (~done).to(dtype),
        "bootstrap_value": randn(B),
        "values": randn(T, B),
        "target_logp": -1.0 + 0.3 * randn(T, B),
        "behaviour_logp": -1.0 + 0.3 * randn(T, B),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def cases(x: dict[str, torch.Tensor]):
    """(name, zero-argument callable) for every function and estimator."""
    returns_args = (x["rewards"], x["discounts"], x["bootstrap_value"])
    logps = {"target_logp": x["target_logp"], "behaviour_logp": x["behaviour_logp"]}
    yield "discounted_returns", lambda: est.discounted_returns(*returns_args)
    for estimator in est.ESTIMATORS:
        kw = logps if estimator not in ("reinforce", "reward_to_go") else {}
        yield (
            f"pg_weights {estimator}",
            lambda e=estimator, kw=kw: est.pg_weights(*returns_args, estimator=e, **kw),
        )
    yield (
        "pg_weights per_decision_is, baseline=values, rho_clip=1",
        lambda: est.pg_weights(
            *returns_args,
            estimator="per_decision_is",
            baseline=x["values"],
            rho_clip=1.0,
            **logps,
        ),
    )
    yield (
        "vtrace",
        lambda: est.vtrace(
            x["behaviour_logp"],
            x["target_logp"],
            x["rewards"],
            x["values"],
            x["bootstrap_value"],
            x["discounts"],
        ),
    )


def time_call(fn, *, repeats: int, warmup: int, cuda: bool) -> list[float]:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--T", type=int, default=100, help="time steps per column")
    parser.add_argument("--B", type=int, default=1024, help="columns (batch size)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")

    inputs = make_inputs(args.T, args.B, getattr(torch, args.dtype), args.device)
    device_name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    print(
        f"T={args.T}, B={args.B}, {args.dtype}, device={args.device} ({device_name}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"median and min of {args.repeats} calls\n"
    )
    print("| function | median ms | min ms |")
    print("| --- | ---: | ---: |")
    for name, fn in cases(inputs):
        times = time_call(fn, repeats=args.repeats, warmup=args.warmup, cuda=cuda)
        median, fastest = statistics.median(times) * 1e3, min(times) * 1e3
        print(f"| {name} | {median:.3f} | {fastest:.3f} |")


if __name__ == "__main__":
    main()
