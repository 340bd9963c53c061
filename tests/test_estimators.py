"""`learner.estimators` against the loop references of `tests/reference.py`, plus bad input."""

from __future__ import annotations

import numpy as np
import pytest
import reference
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner import columns
from learner import estimators as est

torch.set_num_threads(1)
CUDA = torch.cuda.is_available()

DTYPES = [torch.float32, torch.float64]
SHAPES = [(1, 1), (6, 4), (23, 3)]
IS_ESTIMATORS = ("trajectory_is", "per_decision_is", "reduced_is", "first_order_is")


def make_batch(T, B, dtype, *, ends, seed=0, device="cpu"):
    """Random time-major inputs. With `ends`, about a quarter of the discounts are 0 (episode
    ends mid-column), and column 0 always ends at its last step while column 1 (if any) runs
    on unterminated, so both bootstrap cases appear."""
    rng = np.random.default_rng(seed)
    discounts = rng.uniform(0.5, 1.0, (T, B))
    if ends:
        discounts[rng.random((T, B)) < 0.25] = 0.0
        discounts[-1, 0] = 0.0
        if B > 1:
            discounts[-1, 1] = 0.9
    arrays = {
        "rewards": rng.normal(0.5, 1.0, (T, B)),
        "discounts": discounts,
        "bootstrap_value": rng.normal(1.0, 1.0, (B,)),
        "values": rng.normal(1.0, 1.0, (T, B)),
        "target_logp": rng.normal(-1.0, 0.4, (T, B)),
        "behaviour_logp": rng.normal(-1.0, 0.4, (T, B)),
    }
    return {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in arrays.items()}


def assert_close(actual, expected, rtol=1e-5):
    """Agreement to `rtol` relative to each element, or to the array's scale near zero."""
    actual = actual.detach().cpu().double().numpy()
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def to_numpy(batch):
    return {k: v.cpu().double().numpy() for k, v in batch.items()}


def pg_args(batch, keys=("rewards", "discounts", "bootstrap_value")):
    return [batch[k] for k in keys]


# --------------------------------------------------------------------------------------------
# Agreement with the references.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ends", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_discounted_returns_matches_reference(shape, ends, dtype):
    batch = make_batch(*shape, dtype, ends=ends)
    out = est.discounted_returns(*pg_args(batch))
    assert out.dtype == dtype and out.shape == shape
    assert_close(out, reference.discounted_returns(*pg_args(to_numpy(batch))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ends", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rho_clip", [None, 0.8, 1.5])
@pytest.mark.parametrize("baseline", [None, "mean", "values"])
@pytest.mark.parametrize("estimator", est.ESTIMATORS)
def test_pg_weights_matches_reference(estimator, baseline, rho_clip, shape, ends, dtype):
    batch = make_batch(*shape, dtype, ends=ends, seed=1)
    ref = to_numpy(batch)
    kwargs = {"estimator": estimator, "rho_clip": rho_clip}
    if estimator in IS_ESTIMATORS:
        kwargs |= {"target_logp": batch["target_logp"], "behaviour_logp": batch["behaviour_logp"]}
    ref_kwargs = {**kwargs, **{k: ref[k] for k in ("target_logp", "behaviour_logp")}}
    out = est.pg_weights(
        *pg_args(batch),
        baseline=batch["values"] if baseline == "values" else baseline,
        **kwargs,
    )
    expected = reference.pg_weights(
        *pg_args(ref),
        baseline=ref["values"] if baseline == "values" else baseline,
        **ref_kwargs,
    )
    assert out.dtype == dtype and out.shape == shape
    assert_close(out, expected)


VTRACE_CLIPS = [(1.0, 1.0, 1.0), (None, None, None), (2.0, 0.5, 1.5), (0.5, None, 3.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ends", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clips", VTRACE_CLIPS)
def test_vtrace_matches_reference(clips, shape, ends, dtype):
    batch = make_batch(*shape, dtype, ends=ends, seed=2)
    keys = ("behaviour_logp", "target_logp", "rewards", "values", "bootstrap_value", "discounts")
    rho_clip, c_clip, pg_rho_clip = clips
    clip_kwargs = {"rho_clip": rho_clip, "c_clip": c_clip, "pg_rho_clip": pg_rho_clip}
    out = est.vtrace(*pg_args(batch, keys), **clip_kwargs)
    vs, adv = reference.vtrace(*pg_args(to_numpy(batch), keys), **clip_kwargs)
    assert isinstance(out, est.VTraceReturns)
    assert out.vs.dtype == dtype and out.pg_advantages.shape == shape
    assert_close(out.vs, vs)
    assert_close(out.pg_advantages, adv)


def test_optimal_baseline_matches_reference_and_minimises_the_variance_term():
    rng = np.random.default_rng(3)
    returns, grad_sq = rng.normal(2.0, 1.0, 50), rng.exponential(1.0, 50)
    b = est.optimal_baseline(torch.tensor(returns), torch.tensor(grad_sq))
    assert b.dim() == 0
    assert b.item() == pytest.approx(reference.optimal_baseline(returns, grad_sq), rel=1e-12)

    def second_moment(c):  # sum g^2 (R - c)^2, the part of the variance the baseline moves
        return float(np.sum(grad_sq * (returns - c) ** 2))

    for c in (b.item() - 0.1, b.item() + 0.1, float(returns.mean())):
        assert second_moment(b.item()) < second_moment(c)


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 12),
    B=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    end_rate=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    estimator=st.sampled_from(est.ESTIMATORS),
)
def test_pg_weights_matches_reference_on_any_episode_pattern(T, B, seed, end_rate, estimator):
    rng = np.random.default_rng(seed)
    batch = make_batch(T, B, torch.float64, ends=False, seed=seed)
    discounts = np.where(rng.random((T, B)) < end_rate, 0.0, 0.95)
    batch["discounts"] = torch.tensor(discounts)
    ref = to_numpy(batch)
    logps = {k: batch[k] for k in ("target_logp", "behaviour_logp")}
    out = est.pg_weights(*pg_args(batch), estimator=estimator, baseline=batch["values"], **logps)
    expected = reference.pg_weights(
        *pg_args(ref),
        estimator=estimator,
        baseline=ref["values"],
        target_logp=ref["target_logp"],
        behaviour_logp=ref["behaviour_logp"],
    )
    assert_close(out, expected, rtol=1e-9)


# --------------------------------------------------------------------------------------------
# Relationships between the estimators.


@pytest.mark.parametrize("dtype", DTYPES)
def test_vtrace_lambda_zero_gives_one_step_targets_and_one_is_the_default(dtype):
    batch = make_batch(12, 3, dtype, ends=True, seed=9)
    args = (
        batch["behaviour_logp"],
        batch["target_logp"],
        batch["rewards"],
        batch["values"],
        batch["bootstrap_value"],
        batch["discounts"],
    )
    zero = est.vtrace(*args, lambda_=0.0)
    rhos = (batch["target_logp"] - batch["behaviour_logp"]).exp().clamp(max=1.0)
    values_next = torch.cat([batch["values"][1:], batch["bootstrap_value"][None]])
    one_step = batch["values"] + rhos * (
        batch["rewards"] + batch["discounts"] * values_next - batch["values"]
    )
    torch.testing.assert_close(zero.vs, one_step)
    default, one = est.vtrace(*args), est.vtrace(*args, lambda_=1.0)
    torch.testing.assert_close(default.vs, one.vs)
    with pytest.raises(ValueError, match="lambda_"):
        est.vtrace(*args, lambda_=1.5)


@pytest.mark.parametrize("clip", [1.0, 2.0, None])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vtrace_on_policy_is_the_n_step_bootstrapped_return(dtype, clip):
    batch = make_batch(20, 5, dtype, ends=True, seed=4)
    logp = batch["target_logp"]
    out = est.vtrace(
        logp,
        logp,
        batch["rewards"],
        batch["values"],
        batch["bootstrap_value"],
        batch["discounts"],
        rho_clip=clip,
        c_clip=clip,
        pg_rho_clip=clip,
    )
    # The n-step return from t bootstraps once, at the column's end: written out explicitly.
    ref = to_numpy(batch)
    T, B = ref["rewards"].shape
    n_step = np.zeros((T, B))
    for b in range(B):
        for t in range(T):
            total, discount = 0.0, 1.0
            for k in range(t, T):
                total += discount * ref["rewards"][k, b]
                discount *= ref["discounts"][k, b]
            n_step[t, b] = total + discount * ref["bootstrap_value"][b]
    assert_close(out.vs, n_step)
    # On-policy the advantage is the return minus the value: A_t = G_t - V(s_t).
    assert_close(out.pg_advantages, n_step - ref["values"])
    # ... and vs does not depend on the value estimates at all.
    other = est.vtrace(
        logp,
        logp,
        batch["rewards"],
        batch["values"] * 3 - 1,
        batch["bootstrap_value"],
        batch["discounts"],
        rho_clip=clip,
        c_clip=clip,
    )
    assert_close(other.vs, n_step)


@pytest.mark.parametrize("pg_rho_clip", [0.7, 1.0, None])
def test_vtrace_pg_advantages_are_clipped_rho_times_the_one_step_vs_target(pg_rho_clip):
    batch = make_batch(15, 6, torch.float64, ends=True, seed=5)
    out = est.vtrace(
        batch["behaviour_logp"],
        batch["target_logp"],
        batch["rewards"],
        batch["values"],
        batch["bootstrap_value"],
        batch["discounts"],
        rho_clip=1.0,
        c_clip=1.0,
        pg_rho_clip=pg_rho_clip,
    )
    rho = torch.exp(batch["target_logp"] - batch["behaviour_logp"])
    if pg_rho_clip is not None:
        rho = rho.clamp(max=pg_rho_clip)
    vs_next = torch.cat([out.vs[1:], batch["bootstrap_value"][None]])
    target = batch["rewards"] + batch["discounts"] * vs_next
    torch.testing.assert_close(out.pg_advantages, rho * (target - batch["values"]))


@pytest.mark.parametrize("baseline", [None, "mean", "values"])
def test_importance_sampling_estimators_reduce_to_on_policy_ones_when_mu_is_pi(baseline):
    batch = make_batch(17, 5, torch.float64, ends=True, seed=6)
    base = batch["values"] if baseline == "values" else baseline
    logps = {"target_logp": batch["target_logp"], "behaviour_logp": batch["target_logp"]}

    def weights(estimator, **kw):
        return est.pg_weights(*pg_args(batch), estimator=estimator, baseline=base, **kw)

    torch.testing.assert_close(weights("trajectory_is", **logps), weights("reinforce"))
    for estimator in ("per_decision_is", "reduced_is", "first_order_is"):
        torch.testing.assert_close(weights(estimator, **logps), weights("reward_to_go"))


def test_vtrace_pg_advantages_on_policy_equal_reward_to_go_with_a_value_baseline():
    batch = make_batch(12, 7, torch.float64, ends=True, seed=7)
    logp = batch["target_logp"]
    out = est.vtrace(
        logp,
        logp,
        batch["rewards"],
        batch["values"],
        batch["bootstrap_value"],
        batch["discounts"],
    )
    w = est.pg_weights(*pg_args(batch), estimator="reward_to_go", baseline=batch["values"])
    torch.testing.assert_close(out.pg_advantages, w)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_long_float32_columns_keep_their_precision_across_segments(device):
    # The ratio products of a 500-step segment late in a 2000-step column, in float32, stay
    # within 1e-5 of float64: no running total from earlier segments leaks into them.
    batch = make_batch(2000, 2, torch.float64, ends=False, seed=8)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    batch["target_logp"] = batch["behaviour_logp"] - 0.05 + 0.01 * noise
    batch["rewards"] = batch["rewards"].abs() + 0.5  # returns far from 0: the error is in P
    batch["discounts"][1500] = 0.0
    logps = {k: batch[k] for k in ("target_logp", "behaviour_logp")}
    f64 = est.pg_weights(*pg_args(batch), estimator="reduced_is", **logps)
    f32 = est.pg_weights(
        *[x.to(device, torch.float32) for x in pg_args(batch)],
        estimator="reduced_is",
        **{k: v.to(device, torch.float32) for k, v in logps.items()},
    )
    tail = slice(1501, None)  # the second segment restarts its products at step 1501
    torch.testing.assert_close(f32[tail].cpu().double(), f64[tail], rtol=1e-5, atol=0)


def test_results_are_detached_and_inputs_untouched():
    batch = make_batch(9, 3, torch.float64, ends=True, seed=9)
    for x in batch.values():
        x.requires_grad_(True)
    before = {k: v.detach().clone() for k, v in batch.items()}
    outs = [
        est.discounted_returns(*pg_args(batch)),
        est.pg_weights(
            *pg_args(batch),
            estimator="per_decision_is",
            baseline=batch["values"],
            target_logp=batch["target_logp"],
            behaviour_logp=batch["behaviour_logp"],
        ),
        *est.vtrace(
            batch["behaviour_logp"],
            batch["target_logp"],
            batch["rewards"],
            batch["values"],
            batch["bootstrap_value"],
            batch["discounts"],
        ),
        est.optimal_baseline(batch["rewards"][0], batch["values"][0] ** 2),
    ]
    assert not any(out.requires_grad for out in outs)
    for k, v in batch.items():
        assert torch.equal(v.detach(), before[k]), k


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_agrees_with_cpu(dtype):
    cpu = make_batch(30, 64, dtype, ends=True, seed=10)
    gpu = {k: v.cuda() for k, v in cpu.items()}
    for estimator in est.ESTIMATORS:
        results = []
        for batch in (cpu, gpu):
            out = est.pg_weights(
                *pg_args(batch),
                estimator=estimator,
                baseline=batch["values"],
                target_logp=batch["target_logp"],
                behaviour_logp=batch["behaviour_logp"],
                rho_clip=1.2,
            )
            assert out.device == batch["rewards"].device
            results.append(out.cpu())
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    keys = ("behaviour_logp", "target_logp", "rewards", "values", "bootstrap_value", "discounts")
    vs_cpu, adv_cpu = est.vtrace(*pg_args(cpu, keys))
    vs_gpu, adv_gpu = est.vtrace(*pg_args(gpu, keys))
    torch.testing.assert_close(vs_gpu.cpu(), vs_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adv_gpu.cpu(), adv_cpu, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad input: every check raises ValueError and names the argument.


def test_estimators_constant_lists_the_six_estimators():
    assert est.ESTIMATORS == (
        "reinforce",
        "reward_to_go",
        "trajectory_is",
        "per_decision_is",
        "reduced_is",
        "first_order_is",
    )


def _pg_call(**override):
    batch = make_batch(5, 3, torch.float32, ends=True, seed=11)
    kwargs = {
        "rewards": batch["rewards"],
        "discounts": batch["discounts"],
        "bootstrap_value": batch["bootstrap_value"],
        "estimator": "per_decision_is",
        "baseline": batch["values"],
        "target_logp": batch["target_logp"],
        "behaviour_logp": batch["behaviour_logp"],
    }
    kwargs |= {k: v(kwargs[k]) if callable(v) else v for k, v in override.items()}
    est.pg_weights(**kwargs)


def _nan_at(x):
    x = x.clone()
    x.view(-1)[x.numel() // 2] = float("nan")
    return x


def _inf_at(x):
    x = x.clone()
    x.view(-1)[-1] = float("inf")
    return x


PG_BAD_INPUTS = {
    "rewards rank 1": ({"rewards": lambda x: x[0]}, "rewards"),
    "rewards rank 3": ({"rewards": lambda x: x[..., None]}, "rewards"),
    "discounts shape": ({"discounts": lambda x: x[:-1]}, "discounts"),
    "target_logp shape": ({"target_logp": lambda x: x[:, :-1]}, "target_logp"),
    "behaviour_logp shape": ({"behaviour_logp": lambda x: x.T}, "behaviour_logp"),
    "baseline shape": ({"baseline": lambda x: x[:-1]}, "baseline"),
    "bootstrap_value shape": ({"bootstrap_value": lambda x: x[:-1]}, "bootstrap_value"),
    "bootstrap_value rank": ({"bootstrap_value": lambda x: x[None]}, "bootstrap_value"),
    "rewards NaN": ({"rewards": _nan_at}, "rewards"),
    "discounts NaN": ({"discounts": _nan_at}, "discounts"),
    "bootstrap_value inf": ({"bootstrap_value": _inf_at}, "bootstrap_value"),
    "baseline NaN": ({"baseline": _nan_at}, "baseline"),
    "target_logp -inf": ({"target_logp": lambda x: -_inf_at(x)}, "target_logp"),
    "behaviour_logp NaN": ({"behaviour_logp": _nan_at}, "behaviour_logp"),
    "discounts > 1": ({"discounts": lambda x: x + 1.5}, "discounts"),
    "discounts < 0": ({"discounts": lambda x: x - 1.5}, "discounts"),
    "rewards float64": ({"rewards": lambda x: x.double()}, "rewards"),
    "rewards int": ({"rewards": lambda x: x.long()}, "rewards"),
    "rewards numpy": ({"rewards": lambda x: x.numpy()}, "rewards"),
    "empty": ({"rewards": lambda x: x[:0], "discounts": lambda x: x[:0]}, "rewards"),
    "missing target_logp": ({"target_logp": None}, "target_logp"),
    "missing behaviour_logp": ({"behaviour_logp": None}, "behaviour_logp"),
    "baseline name": ({"baseline": "median"}, "baseline"),
    "baseline type": ({"baseline": 3.0}, "baseline"),
    "rho_clip zero": ({"rho_clip": 0.0}, "rho_clip"),
    "rho_clip inf": ({"rho_clip": float("inf")}, "rho_clip"),
    "rho_clip string": ({"rho_clip": "1"}, "rho_clip"),
}


@pytest.mark.parametrize("case", PG_BAD_INPUTS)
def test_pg_weights_rejects_bad_input(case):
    override, name = PG_BAD_INPUTS[case]
    with pytest.raises(ValueError, match=name):
        _pg_call(**override)


def test_pg_weights_unknown_estimator_lists_the_valid_ones():
    with pytest.raises(ValueError, match="estimator") as info:
        _pg_call(estimator="vanilla")
    for name in est.ESTIMATORS:
        assert name in str(info.value)


@pytest.mark.parametrize("estimator", IS_ESTIMATORS)
def test_importance_sampling_estimators_require_both_log_probs(estimator):
    with pytest.raises(ValueError, match="target_logp"):
        _pg_call(estimator=estimator, target_logp=None)
    with pytest.raises(ValueError, match="behaviour_logp"):
        _pg_call(estimator=estimator, behaviour_logp=None)


def test_on_policy_estimators_need_no_log_probs():
    for estimator in ("reinforce", "reward_to_go"):
        _pg_call(estimator=estimator, target_logp=None, behaviour_logp=None)


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"rewards": lambda x: x[:, :2]}, "rewards"),
        ({"discounts": lambda x: x[:-1]}, "discounts"),
        ({"bootstrap_value": lambda x: x[:-1]}, "bootstrap_value"),
        ({"discounts": _inf_at}, "discounts"),
        ({"discounts": lambda x: -x - 0.1}, "discounts"),
    ],
)
def test_discounted_returns_rejects_bad_input(override, name):
    batch = make_batch(5, 3, torch.float32, ends=True, seed=12)
    args = {k: batch[k] for k in ("rewards", "discounts", "bootstrap_value")}
    args |= {k: f(args[k]) for k, f in override.items()}
    with pytest.raises(ValueError, match=name):
        est.discounted_returns(**args)


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"values": lambda x: x[:-1]}, "values"),
        ({"behaviour_logp": lambda x: x[0]}, "behaviour_logp"),
        ({"target_logp": _nan_at}, "target_logp"),
        ({"values": _inf_at}, "values"),
        ({"bootstrap_value": lambda x: x.double()}, "bootstrap_value"),
        ({"rho_clip": -1.0}, "rho_clip"),
        ({"c_clip": 0}, "c_clip"),
        ({"pg_rho_clip": float("nan")}, "pg_rho_clip"),
    ],
)
def test_vtrace_rejects_bad_input(override, name):
    batch = make_batch(5, 3, torch.float32, ends=True, seed=13)
    keys = ("behaviour_logp", "target_logp", "rewards", "values", "bootstrap_value", "discounts")
    args = {k: batch[k] for k in keys}
    args |= {k: f(args[k]) if callable(f) else f for k, f in override.items()}
    with pytest.raises(ValueError, match=name):
        est.vtrace(**args)


@pytest.mark.parametrize(
    ("returns", "grad_sq_norms", "name"),
    [
        (torch.ones(4), torch.ones(3), "grad_sq_norms"),
        (torch.ones(2, 2), torch.ones(2, 2), "returns"),
        (torch.ones(3), -torch.ones(3), "grad_sq_norms"),
        (torch.ones(3), torch.zeros(3), "grad_sq_norms"),
        (torch.tensor([1.0, float("nan")]), torch.ones(2), "returns"),
        (torch.ones(2), torch.ones(2, dtype=torch.float64), "grad_sq_norms"),
    ],
)
def test_optimal_baseline_rejects_bad_input(returns, grad_sq_norms, name):
    with pytest.raises(ValueError, match=name):
        est.optimal_baseline(returns, grad_sq_norms)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1, 2, 3, 16, 37, 100])
def test_log_depth_scan_matches_the_loop(T, reverse):
    # CUDA runs the log-depth scan; it must solve the same recurrence as the loop CPU runs.
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, 5, generator=gen, dtype=torch.float64)
    y = torch.rand(T, 5, generator=gen, dtype=torch.float64)
    y[y < 0.2] = 0.0
    init = torch.randn(5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        columns.scan_log_depth(x, y, init, reverse=reverse),
        columns.scan_loop(x, y, init, reverse=reverse),
    )
