"""Data-parallel learners (`learner.num_learners`, issue 15).

The step's arithmetic runs in-process: two `Learner`s in two threads joined by a real gloo
process group (`torch.distributed.ProcessGroupGloo` over an in-memory store) take the same code
path as two learner processes, without two more torch processes to start. The Ray side (the
rendezvous, the re-forming of the group after a rank dies) is the CartPole run at the end.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time

import pytest
import ray
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deploy import metrics as tags
from deploy.commands import format_status
from deploy.config import load_config
from deploy.job import train
from deploy.session import ray_cpus
from learner.config import LearnerConfig
from learner.distributed import GradientSync, GroupBroken, align
from learner.learner import Learner
from learner.spec import PolicySpec
from replay.trajectory import Batch

SPEC = PolicySpec((4,), "float32", "discrete", 4)
torch.set_num_threads(1)


def _in_threads(world: int, body, timeout_s: float = 30.0) -> list:
    """Run `body(rank, all_reduce, broadcast)` in `world` threads, each a rank of one gloo
    group; their results in rank order (an exception in one is raised here)."""
    store = dist.HashStore()
    results: list = [None] * world
    errors: list[BaseException] = []

    def rank_thread(rank: int) -> None:
        try:
            timeout = datetime.timedelta(seconds=timeout_s)
            group = dist.ProcessGroupGloo(dist.PrefixStore("t", store), rank, world, timeout)
            results[rank] = body(
                rank,
                lambda t: group.allreduce([t]).wait(),
                lambda t: group.broadcast(t, 0).wait(),
            )
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=rank_thread, args=(r,), name=f"rank-{r}") for r in range(world)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s * 2)
    if errors:
        raise errors[0]
    return results


def test_two_ranks_on_half_batches_step_like_one_learner_on_the_whole_batch(make_fragment):
    fragments = [make_fragment(16, 4, seed=seed) for seed in range(4)]
    whole, halves = Batch.stack(fragments), [Batch.stack(fragments[:2]), Batch.stack(fragments[2:])]
    real_steps = [int((~h.autoreset).sum()) for h in halves]
    # Halves of different sizes: a plain mean of the two gradients would not be the whole's.
    assert real_steps[0] != real_steps[1], real_steps
    # A small max_grad_norm: the clip must act on the averaged gradient, as one learner's does.
    config = LearnerConfig(batch_size=4, num_learners=2, policy_clip=0.2, max_grad_norm=0.05)
    torch.manual_seed(0)
    ranks = [Learner(SPEC, config), Learner(SPEC, config)]  # each initialised differently
    start = {k: v.clone() for k, v in ranks[0].model.state_dict().items()}
    single = Learner(SPEC, config)
    single.model.load_state_dict(start)

    def body(rank, all_reduce, broadcast):
        learner = ranks[rank]
        learner.version = align(learner.model, 0, None, broadcast)  # rank 0's weights
        learner.sync = GradientSync(all_reduce)
        return [learner.step(halves[rank]) for _ in range(3)]

    by_rank = _in_threads(2, body)
    expected = [single.step(whole) for _ in range(3)]

    for name, value in single.model.state_dict().items():
        assert torch.equal(ranks[0].model.state_dict()[name], ranks[1].model.state_dict()[name])
        torch.testing.assert_close(ranks[0].model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    moved = sum(float((v - start[k]).abs().sum()) for k, v in single.model.state_dict().items())
    assert moved > 1e-3, "the steps changed the weights"
    for got, want in zip(by_rank[0], expected, strict=True):
        assert got.samples == want.samples == sum(real_steps)
        assert not got.skipped
        for field in ("loss", "policy_loss", "value_loss", "entropy", "grad_norm", "ess"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-4), field
    assert by_rank[0][-1].grad_norm > config.max_grad_norm, "the clip was active"
    assert ranks[0].version == ranks[1].version == single.version == 3


def test_a_rank_left_alone_in_a_collective_fails_after_the_group_timeout():
    """Rank 1 is alive but never steps: rank 0's all-reduce raises `GroupBroken` after the
    group's timeout (1 s) instead of waiting for ever."""
    started, done = [], threading.Event()

    def body(rank, all_reduce, broadcast):
        if rank == 1:  # keeps its end of the group open until rank 0 has given up
            return done.wait(30)
        params = [torch.nn.Parameter(torch.ones(3))]
        params[0].grad = torch.ones(3)
        stats = {"loss": torch.tensor(1.0), "samples": torch.tensor(4.0), "bad": torch.tensor(0.0)}
        started.append(time.monotonic())
        with pytest.raises(GroupBroken, match="the gradient all-reduce failed"):
            GradientSync(all_reduce)(params, stats)
        done.set()
        return time.monotonic() - started[0]

    waited = _in_threads(2, body, timeout_s=1.0)[0]
    assert 0.5 < waited < 15, waited


class _KillRank:
    """SIGKILLs learner rank `rank` once the group has stepped 20 times and checkpointed; keeps
    what `offpg status` shows after the group re-formed."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.at_env_steps: int | None = None
        self.version = -1
        self.status: str | None = None

    def __call__(self, job) -> None:
        if self.at_env_steps is None:
            if job.version >= 20 and list(job.checkpoint_dir.glob("*.pt")):
                learner = job.topology.learners[self.rank]
                os.kill(ray.get(learner.pid.remote(), timeout=30), signal.SIGKILL)
                self.at_env_steps, self.version = job.env_steps, job.version
        elif self.status is None and job.faults.learner_restarts:
            self.status = format_status(ray.get(job.controller.status.remote(), timeout=30))


@pytest.mark.slow
def test_two_learners_solve_cartpole_and_survive_losing_one(local_ray, tmp_path):
    """The default recipe with `learner.num_learners=2`: rank 1 is SIGKILLed mid-run, the whole
    group re-forms from the checkpoint (counted once), and CartPole is still solved within the
    env-step budget, after the kill."""
    config = load_config(
        None,
        [
            "learner.num_learners=2",
            "learner.checkpoint_every=1.0",
            "run.log_every=1.0",
            "run.max_env_steps=1000000",
        ],
        extra={"run.logdir": str(tmp_path), "run.name": "two"},
    )
    kill = _KillRank(1)
    summary = train(config, on_poll=kill)
    assert kill.at_env_steps is not None, summary.line()
    assert summary.ok and summary.solved, summary.line()
    assert summary.solved_at_env_steps > kill.at_env_steps
    assert summary.learner_restarts == 1, summary.line()
    assert [r["rank"] for r in summary.learners] == [0, 1]
    assert all(r["device"] == "cpu" and r["node"] for r in summary.learners)
    assert summary.learner_version > kill.version, "the version never goes back"
    events = EventAccumulator(summary.run_dir, size_guidance={"scalars": 0})
    events.Reload()
    assert events.Scalars(tags.LEARNER_RESTARTS)[-1].value == 1
    assert kill.status is not None and "(2 learners: rank 0 cpu on " in kill.status, kill.status
    assert ", rank 1 cpu on " in kill.status


def test_the_embedded_ray_has_a_cpu_for_every_learner():
    """Each learner reserves a CPU: an embedded Ray sized for one would leave an actor pending
    for ever."""
    config = load_config(None, ["learner.num_learners=2", "run.num_actors=3"])
    assert ray_cpus(config) >= 3 + 2
