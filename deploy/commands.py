"""`offpg scale | status | stop RUN`: talk to a running job through its named controller.

`--address` picks the way in:
- a GCS address (`HOST:6379`), `ray://HOST:10001`, or nothing (`RAY_ADDRESS`, else the Ray
  cluster on this machine): join the cluster and call the controller directly (about a second);
- the dashboard URL (`http://HOST:8265`, what `offpg launch` used): relay the same command to
  the cluster as a short job (`deploy.launch.relay`), for machines that only reach the dashboard.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from deploy import controller
from deploy.controller import RunNotFound

#: Seconds `offpg stop` waits for the final checkpoint before giving up waiting.
STOP_WAIT_S = 300.0


def is_http(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def resolve_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def run_command(command: str, args: Any) -> int:
    """Dispatch `offpg scale | status | stop` (parsed `args`); returns the exit status."""
    if command == "scale" and not 0 <= args.actors <= controller.MAX_ACTORS:
        print(f"offpg: --actors must be in [0, {controller.MAX_ACTORS}]", file=sys.stderr)
        return 2
    address = resolve_address(args.address)
    if is_http(address):
        from deploy import launch

        argv = [command, args.run]
        if command == "scale":
            argv += ["--actors", str(args.actors)]
        if command == "status" and args.json:
            argv.append("--json")
        if command == "stop" and args.no_wait:
            argv.append("--no-wait")
        return launch.relay(args.run, argv, address=address)
    try:
        controller.connect(address)
        if command == "scale":
            return scale(args.run, args.actors)
        if command == "status":
            return status(args.run, as_json=args.json)
        return stop(args.run, wait=not args.no_wait)
    except RunNotFound as exc:
        print(f"offpg: {exc}", file=sys.stderr)
        return 1
    except controller.TokenRefused as exc:
        print(f"offpg: {exc}", file=sys.stderr)
        return 2


def scale(run: str, num_actors: int) -> int:
    answer = controller.call(run, "scale", num_actors)
    print(
        f"offpg: run {run}: {answer['previous']} -> {answer['desired']} actor(s) requested; "
        "the driver applies it at its next poll (offpg status shows it)",
        flush=True,
    )
    return 0


def status(run: str, *, as_json: bool) -> int:
    state = controller.call(run, "status")
    if as_json:
        print(json.dumps(state, sort_keys=True, default=str), flush=True)
    else:
        print(format_status(state), flush=True)
    return 0


def stop(run: str, *, wait: bool) -> int:
    controller.call(run, "request_stop", "stop requested (offpg stop)")
    print(f"offpg: run {run}: stop requested", flush=True)
    if not wait:
        return 0
    try:
        final = controller.call(run, "wait_stopped", STOP_WAIT_S, timeout=STOP_WAIT_S + 30)
    except RunNotFound:
        print(f"offpg: run {run} has ended", flush=True)
        return 0
    if final is None:
        print(f"offpg: run {run} did not stop within {STOP_WAIT_S:g} s", file=sys.stderr)
        return 1
    print(
        f"offpg: run {run} stopped at {final['env_steps']:,} env steps, learner "
        f"v{final['learner']['version']}; final checkpoint {final['last_checkpoint']}",
        flush=True,
    )
    return 0


def _num(value: Any, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _shards_line(shards: list[dict[str, Any]]) -> str:
    """Each replay shard's size and inserts, when there are several."""
    if len(shards) < 2:
        return ""
    each = ", ".join(
        f"{k}: {_num(sh['size_fragments'])} held / {_num(sh['inserted'])} in"
        for k, sh in enumerate(shards)
    )
    return f"\n         {len(shards)} shards ({each})"


def format_status(s: dict[str, Any]) -> str:
    """The human-readable `offpg status`."""
    if s.get("state") != "running":
        return f"run {s['run']}: {s.get('state')}" + (
            " (stop requested)" if s.get("stop_requested") else ""
        )
    actors = s["actors"]
    line_actors = (
        f"actors   {actors['running']} running, {actors['pending']} pending, "
        f"{actors['restarted']} restarted (desired {s['desired_actors']}; "
        f"{actors['num_envs_each']} envs, {actors['num_cpus_each']:g} CPU each)"
    )
    cluster = s.get("cluster") or {}
    if actors["pending"]:
        line_actors += (
            f"\n         pending actors wait for CPUs: the cluster has "
            f"{_num(cluster.get('cpus_free'), 'g')} of {_num(cluster.get('cpus_total'), 'g')} "
            "free; they start when nodes are added"
        )
    replay = s.get("replay") or {}
    lines = [
        f"run      {s['run']} ({s['env_id']}), {s['state']}"
        + (", stop requested" if s.get("stop_requested") else "")
        + f", updated {s['status_age_s']:.1f} s ago",
        line_actors,
        f"steps    {_num(s['env_steps'])} env steps, {_num(s.get('env_steps_per_s'))}/s, "
        f"mean return {_num(s.get('return_mean'), '.1f')}",
        f"learner  v{s['learner']['version']} on {s['learner']['device']}"
        + _ranks_part(s["learner"].get("ranks") or [])
        + ", "
        f"{_num(s.get('learner_samples_per_s'))} samples/s, policy lag "
        f"{_num(s.get('policy_lag_mean'), '.1f')} mean / {_num(s.get('policy_lag_max'), 'g')} max"
        f" (acting lag {_num(s.get('acting_lag_mean'), '.1f')} + data age "
        f"{_num(s.get('data_age_mean'), '.1f')})",
        f"replay   {_num(replay.get('size_fragments'))} fragments "
        f"({_num(replay.get('size_bytes', 0) / 2**20, '.1f')} MiB), "
        f"{_num(replay.get('inserted_per_s'), '.1f')} inserted/s, "
        f"{_num(replay.get('sampled_per_s'), '.1f')} sampled/s, "
        f"{_num(replay.get('held_back'))} inserts held back"
        + _shards_line(replay.get("shards") or []),
        f"driver   {_num(s.get('driver_poll_ms'), '.1f')} ms per poll; actors waited "
        f"{_num(s.get('backpressure_s'), '.1f')} s on the replay (backpressure)",
        f"ckpt     {s.get('last_checkpoint') or '-'}",
        f"logs     {s['run_dir']}  (TensorBoard: {s['tensorboard']})",
    ]
    return "\n".join(lines)


def _ranks_part(ranks: list[dict]) -> str:
    """The data-parallel learners' ranks, devices and nodes (nothing for one learner)."""
    if len(ranks) < 2:
        return ""
    where = ", ".join(f"rank {r['rank']} {r['device']} on {r['node']}" for r in ranks)
    return f" ({len(ranks)} learners: {where})"
