"""Time to solve CartPole-v1: offpg against RLlib IMPALA, RLlib APPO and Stable-Baselines3 PPO.

    python benchmarks/peers.py                 # 3 seeds of each, writes benchmarks/results/peers.md
    python benchmarks/peers.py --quick         # 1 seed
    python benchmarks/peers.py --peers offpg sb3_ppo --seeds 2

Solved means a mean return >= 475 over the last 100 training episodes, for every system. Each
run is its own subprocess (a fresh interpreter, a fresh Ray), started by this script; the time to
solve is measured here, from the moment the subprocess is spawned to the wall-clock moment the
run saw the target, so interpreter start-up, imports, `ray.init` and the construction of actors
or env runners all count. Every run has a hard env-step budget and a wall-clock timeout (the
process group is killed past it).

The peers run in their own virtual environment, which this script makes on first use under
`benchmarks/.venv-peers` (gitignored): the CPU build of torch first (so pip pulls no CUDA build),
then `ray[rllib]` of the same Ray version as offpg and `stable-baselines3`, each only once a
peer that needs it is asked for. pip picks the Gymnasium version RLlib pins (1.2.x for Ray 2.60;
offpg runs on the main environment's 1.4).

Configurations, from each project's own tuned CartPole-v1 recipe:

- offpg: the defaults (`offpg train`: 1 actor x 64 envs, V-trace, uniform replay), `--actors`
  actors;
- RLlib IMPALA (`rllib/tuned_examples/impala/cartpole_impala.py`): train_batch_size_per_learner
  500, grad_clip 40 by global norm, lr 5e-4, vf_loss_coeff 0.05, entropy_coeff 0, shared value
  layers; `--actors` env runners (one env each, RLlib's default), the local learner;
- RLlib APPO (`rllib/tuned_examples/appo/cartpole_appo.py`): circular_buffer_iterations_per_batch
  2, vf_loss_coeff 0.05, entropy_coeff 0, shared value layers; `--actors` env runners;
- SB3 PPO (rl-zoo `hyperparams/ppo.yml`, CartPole-v1): 8 envs, n_steps 32, batch 256, gae 0.8,
  gamma 0.98, 20 epochs, ent 0, lr lin_1e-3, clip lin_0.2, 1e5 steps (the zoo's n_timesteps,
  which is also the horizon of its linear schedules and so its step budget here).

One change to RLlib's settings, and it is not a learning setting: `min_time_s_per_iteration` is 1
s instead of IMPALA's 10 s, so a solve is noticed within about a second (offpg notices it at its
2 s logging interval), rather than at the next 10 s iteration. Both RLlib algorithms are driven by
`algo.train()` directly (no Tune).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv-peers"
RESULTS = HERE / "results"
RAY_VERSION = "2.60.0"
TORCH_VERSION = "2.13.0"
#: What the peers' venv gets, in order: torch first (the CPU build), then what each peer needs.
#: The stamp file records what is installed, so a peer not installed yet is added to it.
VENV_STEPS: dict[str, tuple[str, ...]] = {
    "torch": (f"torch=={TORCH_VERSION}",),
    "rllib": (f"ray[rllib]=={RAY_VERSION}",),
    "sb3": ("stable-baselines3",),
}
PEERS = ("offpg", "rllib_impala", "rllib_appo", "sb3_ppo")
NAMES = {
    "offpg": "offpg",
    "rllib_impala": "RLlib IMPALA",
    "rllib_appo": "RLlib APPO",
    "sb3_ppo": "SB3 PPO (rl-zoo)",
}
TARGET = 475.0
WINDOW = 100
RESULT_PREFIX = "PEERS-RESULT "


# -- the runs, one per subprocess ---------------------------------------------------------------


def _report(**fields: object) -> None:
    print(RESULT_PREFIX + json.dumps(fields), flush=True)


def child_offpg(seed: int, budget: int, actors: int) -> None:
    sys.path.insert(0, str(ROOT))
    import ray

    from deploy.config import load_config
    from deploy.job import train
    from deploy.session import ray_cpus

    logdir = tempfile.mkdtemp(prefix="offpg-peers-")
    config = load_config(
        None,
        [f"env.seed={seed}"],
        extra={
            "run.num_actors": actors,
            "run.max_env_steps": budget,
            "run.logdir": logdir,
            "run.name": f"peers-s{seed}",
        },
    )
    # The same ray.init that train() would make; started here so the moment training starts is
    # known (train() measures solved_at_s from just after it).
    ray.init(num_cpus=ray_cpus(config), include_dashboard=False, log_to_driver=False)
    started = time.time()
    summary = train(config)
    ray.shutdown()
    _report(
        solved=summary.solved,
        solved_unix=started + summary.solved_at_s if summary.solved else None,
        solved_env_steps=summary.solved_at_env_steps,
        env_steps=summary.env_steps,
        train_s=summary.solved_at_s if summary.solved else summary.wall_s,
        rate_steps=summary.solved_at_env_steps if summary.solved else summary.env_steps,
        return_mean=summary.return_mean,
    )


def child_rllib(algo_name: str, seed: int, budget: int, actors: int, timeout: float) -> None:
    import ray
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    if algo_name == "rllib_impala":
        from ray.rllib.algorithms.impala import IMPALAConfig

        config = IMPALAConfig().training(
            train_batch_size_per_learner=500,
            grad_clip=40.0,
            grad_clip_by="global_norm",
            lr=0.0005,
            vf_loss_coeff=0.05,
            entropy_coeff=0.0,
        )
    else:
        from ray.rllib.algorithms.appo import APPOConfig

        config = APPOConfig().training(
            circular_buffer_iterations_per_batch=2, vf_loss_coeff=0.05, entropy_coeff=0.0
        )
    config = (
        config.environment("CartPole-v1")
        .env_runners(num_env_runners=actors)
        .rl_module(model_config=DefaultModelConfig(vf_share_layers=True))
        .reporting(min_time_s_per_iteration=1)
        .debugging(seed=seed)
    )
    ray.init(include_dashboard=False, log_to_driver=False)
    algo = config.build_algo()
    started = time.time()
    steps, ret, solved_unix, solved_steps = 0, float("nan"), None, None
    while steps < budget and time.time() - started < timeout:
        result = algo.train()
        runners = result.get("env_runners", {})
        # env_runners stays empty until the first (asynchronous) samples are reported; the
        # top-level lifetime counter is there from the first iteration.
        lifetime = runners.get("num_env_steps_sampled_lifetime")
        if lifetime is None:
            lifetime = result.get("num_env_steps_sampled_lifetime", steps)
        steps = int(lifetime or steps)
        ret = float(runners.get("episode_return_mean", float("nan")))
        # RLlib's episode_return_mean is over the last metrics_num_episodes_for_smoothing
        # (default 100) episodes: the same window as offpg's.
        if ret >= TARGET:
            solved_unix, solved_steps = time.time(), steps
            break
        # A progress report per iteration (the driver keeps the last one), so a run the driver
        # has to kill at its timeout still says how far it got.
        _report(
            solved=False,
            solved_unix=None,
            solved_env_steps=None,
            env_steps=steps,
            train_s=time.time() - started,
            rate_steps=steps,
            return_mean=ret,
        )
    now = time.time()
    _report(
        solved=solved_unix is not None,
        solved_unix=solved_unix,
        solved_env_steps=solved_steps,
        env_steps=steps,
        train_s=now - started,
        rate_steps=steps,
        return_mean=ret,
    )
    algo.stop()
    ray.shutdown()


def child_sb3(seed: int, budget: int) -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    def linear(initial: float):  # rl-zoo's lin_<value>
        return lambda progress_remaining: progress_remaining * initial

    class Solved(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.returns: deque[float] = deque(maxlen=WINDOW)
            self.solved_unix: float | None = None
            self.solved_steps: int | None = None

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    self.returns.append(float(info["episode"]["r"]))
            if len(self.returns) == WINDOW and sum(self.returns) / WINDOW >= TARGET:
                self.solved_unix, self.solved_steps = time.time(), self.num_timesteps
                return False
            return True

    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=32,
        batch_size=256,
        gae_lambda=0.8,
        gamma=0.98,
        n_epochs=20,
        ent_coef=0.0,
        learning_rate=linear(1e-3),
        clip_range=linear(0.2),
        seed=seed,
        device="cpu",
        verbose=0,
    )
    callback = Solved()
    started = time.time()
    model.learn(total_timesteps=budget, callback=callback)
    now = time.time()
    returns = callback.returns
    _report(
        solved=callback.solved_unix is not None,
        solved_unix=callback.solved_unix,
        solved_env_steps=callback.solved_steps,
        env_steps=model.num_timesteps,
        train_s=(callback.solved_unix or now) - started,
        rate_steps=model.num_timesteps,
        return_mean=sum(returns) / len(returns) if returns else float("nan"),
    )


# -- the driver ---------------------------------------------------------------------------------


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(peers: list[str]) -> Path:
    """Make (or reuse, or add to) the peers' virtual environment with what `peers` need;
    returns its python."""
    stamp = VENV / "offpg-peers.json"
    want = ["torch"] + [step for step in ("rllib", "sb3") if any(step in p for p in peers)]
    have: dict[str, list[str]] = {}
    if stamp.exists() and venv_python().exists():
        try:
            have = json.loads(stamp.read_text())
        except ValueError:
            have = {}
        if not isinstance(have, dict):  # a stamp of an older layout: make the venv again
            have = {}
    if not have:
        print(f"peers: creating {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    pip = [str(venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for step in want:
        if have.get(step) != list(VENV_STEPS[step]):
            print(f"peers: installing {' '.join(VENV_STEPS[step])} into {VENV}", flush=True)
            subprocess.run([*pip, *VENV_STEPS[step]], check=True)
            have[step] = list(VENV_STEPS[step])
            stamp.write_text(json.dumps(have))
    return venv_python()


def run_one(peer: str, seed: int, budget: int, actors: int, timeout: float) -> dict:
    python = sys.executable if peer == "offpg" else str(venv_python())
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--child",
        peer,
        "--seed",
        str(seed),
        "--budget",
        str(budget),
        "--actors",
        str(actors),
        "--timeout",
        str(timeout),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    env.pop("PYTHONPATH", None)
    load = os.getloadavg()[0]
    spawned = time.time()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=str(ROOT),
        start_new_session=True,  # its own process group: a timeout kills Ray's children too
    )
    try:
        out, _ = proc.communicate(timeout=timeout + 60)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        timed_out = True
    ended = time.time()
    result = None
    for line in out.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    if result is None:
        tail = "\n".join(out.splitlines()[-15:])
        print(f"peers: {peer} seed {seed} gave no result (timed out: {timed_out}):\n{tail}")
        result = {"solved": False, "solved_unix": None, "env_steps": 0, "train_s": 0.0}
    result.update(peer=peer, seed=seed, load_before=load, process_s=ended - spawned)
    result["solve_s"] = result["solved_unix"] - spawned if result["solved"] else None
    result["steps_per_s"] = (
        result.get("rate_steps", 0) / result["train_s"] if result.get("train_s") else 0.0
    )
    return result


def _median(values: list[float | None]) -> float | None:
    """Median where an unsolved run counts as +inf; None when most runs did not solve."""
    vals = sorted(float("inf") if v is None else v for v in values)
    med = statistics.median(vals)
    return None if med == float("inf") else med


def table(results: list[dict], peers: list[str], timeout: float) -> tuple[str, dict]:
    rows, medians = [], {}
    for peer in peers:
        runs = [r for r in results if r["peer"] == peer]
        if not runs:
            continue
        medians[peer] = {
            "solve_s": _median([r["solve_s"] for r in runs]),
            "steps": _median([r.get("solved_env_steps") for r in runs]),
            "rate": statistics.median(r["steps_per_s"] for r in runs),
            "solved": sum(r["solved"] for r in runs),
            "n": len(runs),
        }
    base = medians.get("offpg")
    header = (
        "| system | solved | median time to solve (s) | offpg / peer time | peer / offpg time "
        "(offpg speed-up) | median env steps to solve | median env steps/s | offpg / peer "
        "env steps/s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for peer, m in medians.items():

        def fmt_s(v: float | None) -> str:
            return f"> {timeout:.0f}" if v is None else f"{v:.1f}"

        if base and base["solve_s"] and m["solve_s"]:
            ratio = f"{base['solve_s'] / m['solve_s']:.2f}"
            speedup = f"{m['solve_s'] / base['solve_s']:.1f}x"
        elif base and base["solve_s"] and m["solve_s"] is None:
            ratio = f"< {base['solve_s'] / timeout:.2f}"
            speedup = f"> {timeout / base['solve_s']:.1f}x"
        else:
            ratio = speedup = "-"
        rate_ratio = f"{base['rate'] / m['rate']:.1f}x" if base and m["rate"] else "-"
        steps = "-" if m["steps"] is None else f"{m['steps']:,.0f}"
        rows.append(
            f"| {NAMES[peer]} | {m['solved']}/{m['n']} | {fmt_s(m['solve_s'])} | {ratio} | "
            f"{speedup} | {steps} | {m['rate']:,.0f} | {rate_ratio} |"
        )
    return header + "\n" + "\n".join(rows), medians


def verdict(medians: dict, timeout: float) -> list[str]:
    lines = []
    base = medians.get("offpg")
    if not base or base["solve_s"] is None:
        return ["offpg did not solve in most seeds: no target can be met."]
    for peer, need in (("rllib_impala", 5.0), ("rllib_appo", 5.0), ("sb3_ppo", 1.0)):
        m = medians.get(peer)
        if m is None:
            continue
        want = f">= {need:g}x faster" if need > 1 else "faster"
        if m["solve_s"] is None:
            # The peer did not solve within the timeout: only a lower bound is known.
            bound = timeout / base["solve_s"]
            state = "met" if bound >= need and need > 1 else "not established"
            lines.append(
                f"- Wall time vs {NAMES[peer]}: target {want}; the peer did not solve within "
                f"{timeout:.0f} s, so offpg is > {bound:.1f}x faster: **{state}**."
            )
            continue
        speedup = m["solve_s"] / base["solve_s"]
        ok = speedup >= need if need > 1 else speedup > 1.0
        lines.append(
            f"- Wall time vs {NAMES[peer]}: target {want}; measured {speedup:.1f}x: "
            f"**{'met' if ok else 'MISSED'}**."
        )
    for peer in ("rllib_impala", "rllib_appo"):
        m = medians.get(peer)
        if m is None or not m["rate"]:
            lines.append(f"- Env steps/s vs {NAMES.get(peer, peer)}: no rate measured.")
            continue
        ratio = base["rate"] / m["rate"]
        lines.append(
            f"- Env steps/s vs {NAMES[peer]}: target >= 10x; measured {ratio:.1f}x: "
            f"**{'met' if ratio >= 10 else 'MISSED'}**."
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 seed")
    parser.add_argument("--actors", type=int, default=1, help="offpg actors = RLlib env runners")
    parser.add_argument("--budget", type=int, default=2_000_000, help="env steps (offpg, RLlib)")
    parser.add_argument("--sb3-steps", type=int, default=100_000, help="rl-zoo n_timesteps")
    parser.add_argument("--timeout", type=float, default=300.0, help="wall seconds per run")
    parser.add_argument("--out", default=str(RESULTS / "peers.md"))
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the Markdown from the JSON of a run"
    )
    parser.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        if args.child == "offpg":
            child_offpg(args.seed, args.budget, args.actors)
        elif args.child == "sb3_ppo":
            child_sb3(args.seed, args.budget)
        else:
            child_rllib(args.child, args.seed, args.budget, args.actors, args.timeout)
        return

    seeds = 1 if args.quick else args.seeds
    if args.report_only:
        write_report(json.loads(Path(args.out).with_suffix(".json").read_text()), args, seeds)
        return
    if any(p != "offpg" for p in args.peers):
        ensure_venv(args.peers)
    results = []
    # Seeds outermost: every system sees the same spread of machine load over the session.
    for seed in range(seeds):
        for peer in args.peers:
            budget = args.sb3_steps if peer == "sb3_ppo" else args.budget
            r = run_one(peer, seed, budget, args.actors, args.timeout)
            results.append(r)
            solved = f"solved in {r['solve_s']:.1f} s" if r["solved"] else "NOT solved"
            print(
                f"peers: {NAMES[peer]:18} seed {seed}: {solved}, "
                f"{r.get('solved_env_steps') or r['env_steps']:,} env steps, "
                f"{r['steps_per_s']:,.0f} env steps/s, load {r['load_before']:.1f}",
                flush=True,
            )
            # Written after every run: a session cut short still leaves what it measured.
            write_report(results, args, seeds)


def write_report(results: list[dict], args: argparse.Namespace, seeds: int) -> None:
    md, medians = table(results, args.peers, args.timeout)
    loads = [r["load_before"] for r in results]
    cpu = _cpu_name()
    lines = [
        "# CartPole-v1 time to solve: offpg and its peers",
        "",
        f"`python benchmarks/peers.py{' --quick' if args.quick else ''}` on {cpu}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; {seeds} seed(s) per system, "
        f"{len({r['seed'] for r in results})} seed(s) measured so far; "
        f"{args.actors} offpg actor(s) = RLlib env runner(s); run-by-run 1-minute load average "
        f"before each run {min(loads):.1f}-{max(loads):.1f} (the machine is shared).",
        "",
        "Solved: mean return >= 475 over the last 100 training episodes. Time to solve is "
        "wall time from spawning the run's process (start-up included); env steps/s is the "
        "run's env steps over its training time (start-up excluded). Medians over seeds; an "
        f"unsolved run counts as slower than any solved one (timeout {args.timeout:.0f} s).",
        "",
        md,
        "",
        "Targets:",
        "",
        *verdict(medians, args.timeout),
        "",
        "Runs:",
        "",
        "| system | seed | solved | time to solve (s) | env steps to solve | env steps/s | load |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        t = "-" if r["solve_s"] is None else f"{r['solve_s']:.1f}"
        s = "-" if not r.get("solved_env_steps") else f"{r['solved_env_steps']:,}"
        lines.append(
            f"| {NAMES[r['peer']]} | {r['seed']} | {'yes' if r['solved'] else 'no'} | {t} | "
            f"{s} | {r['steps_per_s']:,.0f} | {r['load_before']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    if len(results) == seeds * len(args.peers):
        print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"peers: wrote {out} ({len(results)} of {seeds * len(args.peers)} runs)", flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "this machine"


if __name__ == "__main__":
    main()
