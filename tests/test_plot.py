"""`offpg plot`: curves read back from event files a real SummaryWriter wrote."""

from __future__ import annotations

import math

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from deploy import plot
from deploy.cli import main

TAG = "episode/return_mean"


def write_run(run_dir, points, tag=TAG):
    writer = SummaryWriter(str(run_dir))
    for step, value in points:
        writer.add_scalar(tag, value, step)
    writer.add_scalar("other/tag", 1.0, 0)
    writer.close()


def test_read_scalar_sorts_drops_nan_and_keeps_last_of_a_step(tmp_path):
    write_run(tmp_path / "r", [(200, 3.0), (0, math.nan), (100, 1.0), (100, 2.0)])
    series = plot.read_scalar(tmp_path / "r", TAG)
    assert series.steps.tolist() == [100, 200]
    assert series.values.tolist() == [2.0, 3.0]


def test_read_scalar_names_the_tags_a_run_has(tmp_path):
    write_run(tmp_path / "r", [(0, 1.0)])
    with pytest.raises(KeyError, match="other/tag"):
        plot.read_scalar(tmp_path / "r", "no/such")


def test_smooth_is_tensorboards_debiased_ema():
    values = np.array([10.0, 0.0, 0.0])
    # acc: 4, 2.4, 1.44; debias by 1 - 0.6^(i+1): 0.4, 0.64, 0.784
    np.testing.assert_allclose(plot.smooth(values, 0.6), [10.0, 2.4 / 0.64, 1.44 / 0.784])
    np.testing.assert_array_equal(plot.smooth(values, 0.0), values)
    with pytest.raises(ValueError, match="0, 1"):
        plot.smooth(values, 1.0)


def test_aggregate_interpolates_over_the_common_range():
    a = plot.Series(np.array([0, 100]), np.array([0.0, 100.0]))
    b = plot.Series(np.array([50, 200]), np.array([50.0, 200.0]))  # same line y = x
    curve = plot.aggregate("x", [a, b], weight=0.0, points=3)
    np.testing.assert_allclose(curve.x, [50, 75, 100])
    np.testing.assert_allclose(curve.mean, [50, 75, 100])
    c = plot.Series(np.array([0, 100]), np.array([10.0, 10.0]))
    d = plot.Series(np.array([0, 100]), np.array([30.0, 30.0]))
    curve = plot.aggregate("y", [c, d], weight=0.0, points=2)
    np.testing.assert_allclose(curve.mean, [20, 20])
    np.testing.assert_allclose(curve.low, [10, 10])
    np.testing.assert_allclose(curve.high, [30, 30])
    assert curve.seeds == 2
    far = plot.Series(np.array([300, 400]), np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="no common range"):
        plot.aggregate("z", [a, far])


def test_groups_plain_paths_are_seeds_and_label_globs_are_curves(tmp_path):
    for name in ("vt-s0", "vt-s1", "none-s0"):
        write_run(tmp_path / name, [(0, 1.0), (10, 2.0)])
    groups = plot.parse_groups([str(tmp_path / "vt-s0"), str(tmp_path / "vt-s1")])
    assert [(label, len(runs)) for label, runs in groups] == [("vt", 2)]
    groups = plot.parse_groups([f"V={tmp_path}/vt-*", f"N={tmp_path}/none-*"])
    assert [(label, len(runs)) for label, runs in groups] == [("V", 2), ("N", 1)]
    # A parent directory expands to every run below it.
    assert len(plot.parse_groups([str(tmp_path)])[0][1]) == 3
    with pytest.raises(ValueError, match="matches no run"):
        plot.parse_groups([f"X={tmp_path}/nothing-*"])


def test_labels_come_from_run_names_never_cutting_a_word_or_a_timestamp():
    assert plot.label_for(["CartPole-v1-20261201-154500"]) == "CartPole-v1-20261201-154500"
    two = ["CartPole-v1-20261201-154500", "CartPole-v1-20261201-155012"]
    assert plot.label_for(two) == "CartPole-v1"
    assert plot.label_for(["vtrace_s0", "vtrace_s1"]) == "vtrace"
    assert plot.label_for(["a", "b"]) == "a + b"
    assert plot.label_for(["a", "b", "c", "d"]) == "a + 3 more"


def test_a_run_with_a_target_gets_it_on_its_curve_and_one_run_is_one_seed(tmp_path, capsys):
    write_run(tmp_path / "solved", [(0, 10.0), (100, 480.0), (200, 484.6)])
    (tmp_path / "solved" / "config.toml").write_text("[run]\ntarget_return = 475.0\n")
    write_run(tmp_path / "open", [(0, 1.0), (200, 2.0)])
    (tmp_path / "open" / "config.toml").write_text('[run]\ntarget_return = "none"\n')
    assert plot.run_target(tmp_path / "solved") == 475.0
    assert plot.run_target(tmp_path / "open") is None
    out = tmp_path / "c.png"
    assert main(["plot", str(tmp_path / "solved"), "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    # Unsmoothed by default: the run ends at what it logged, 484.6, not an average below it.
    assert line == "solved: 1 run, final 484.6 at 200 steps, target 475"
    curve = plot.plot_runs([str(tmp_path / "solved")], out)[0]
    assert curve.target == 475.0 and curve.seeds == 1
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plot.plot_curves([curve], out, ax=ax)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["solved (1 seed)", "target 475"]
    assert ax.get_lines()[1].get_linestyle() == "--"
    plt.close(fig)


def test_cli_plot_writes_a_png_with_one_curve_per_label(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for seed in range(3):
        write_run(
            tmp_path / f"fast-{seed}",
            [(s, min(500.0, s / 10 + rng.normal(0, 5))) for s in range(0, 5001, 250)],
        )
        write_run(
            tmp_path / f"slow-{seed}",
            [(s, s / 100 + rng.normal(0, 5)) for s in range(0, 5001, 250)],
        )
    out = tmp_path / "curves.png"
    code = main(["plot", f"fast={tmp_path}/fast-*", f"slow={tmp_path}/slow-*", "--out", str(out)])
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = capsys.readouterr().out.splitlines()
    fast = next(line for line in lines if line.startswith("fast:"))
    slow = next(line for line in lines if line.startswith("slow:"))
    assert "3 runs" in fast and "3 runs" in slow
    # The final means tell the curves apart: ~500 against ~50.
    assert float(fast.split("final ")[1].split()[0]) > 400
    assert float(slow.split("final ")[1].split()[0]) < 100


def test_cli_plot_unknown_tag_exits_2(tmp_path, capsys):
    write_run(tmp_path / "r", [(0, 1.0)])
    code = main(["plot", str(tmp_path / "r"), "--tag", "nope", "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "no scalar 'nope'" in capsys.readouterr().err


def test_cli_plot_each_draws_one_curve_per_run(tmp_path, capsys):
    """`offpg plot --each runs/<tune-name>`: every trial its own curve, named after it."""
    write_run(tmp_path / "exp" / "exp-00", [(0, 10.0), (100, 20.0)])
    write_run(tmp_path / "exp" / "exp-01", [(0, 100.0), (100, 200.0)])
    out = tmp_path / "each.png"
    assert main(["plot", "--each", str(tmp_path / "exp"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["exp-00", "exp-01"]
    assert all(": 1 run, " in line for line in lines[:2])
