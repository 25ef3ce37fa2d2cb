"""benchmarks.apps._plots: the NLL axes turn symmetric-log only where a spike would flatten the other curves."""

import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")  # an optional extra ("experiments")
from matplotlib.axes import Axes  # noqa: E402

from benchmarks.apps._plots import SPIKE_FACTOR, plot_comparison, symlog_threshold  # noqa: E402


def test_a_smooth_descent_keeps_a_linear_axis() -> None:
    assert symlog_threshold([[3.0, 2.5, 2.0, 1.4], [2.9, 2.2, 1.5]]) is None
    # climbing back up by up to SPIKE_FACTOR times the descent is still linear
    assert symlog_threshold([[3.0, 2.0, 3.0 + SPIKE_FACTOR * 1.0]]) is None
    assert symlog_threshold([[1.0, -0.5, -1.0], [0.8, -1.2]]) is None  # NLLs may be negative


def test_a_spike_or_blow_up_turns_the_axis_symlog_at_the_starting_values() -> None:
    assert symlog_threshold([[3.0, 2.0, 3.0 + SPIKE_FACTOR * 1.0 + 0.01]]) == pytest.approx(3.0)
    assert symlog_threshold([[2.98, 1.4, 1.36], [2.9, 46.0, 1.3]]) == pytest.approx(2.98)
    assert symlog_threshold([[19.7, 3816.0], [19.5, 16.0]]) == pytest.approx(19.7)
    # below zero the lowest value sets the linear range, so no curve's descent is on the log part
    assert symlog_threshold([[1.0, -2.0, 50.0]]) == pytest.approx(2.0)


def test_missing_and_non_finite_values_are_skipped() -> None:
    assert symlog_threshold([]) is None
    assert symlog_threshold([[None, math.nan], []]) is None
    assert symlog_threshold([[3.0, None, math.inf, 2.0], [math.nan, 2.9, 1.5]]) is None
    assert symlog_threshold([[3.0, None, 2.0, 40.0, math.inf]]) == pytest.approx(3.0)


def _record(optimizer: str, metric: str, values: list[float]) -> dict[str, Any]:
    n = len(values)
    return {"config": {"optimizer": optimizer}, "resolved": {"lr": 0.1},
            "task": {"metric": metric, "name": "cnf", "dataset": "toy"},
            "evals": {"time": [float(i) for i in range(n)], "iteration": list(range(n)),
                      "train_loss": values, "test_metric": values},
            "history": {"iteration": [1, 2], "nfe_forward": [14, 14], "nfe_backward": [14, 20],
                        "step_time": [0.1, 0.1]},
            "summary": {"target_loss": 2.0, "target_metric": 2.0},
            "machine": {"cpu": "test", "torch": "x", "torch_threads": 1, "device": "cpu"}}


@pytest.mark.parametrize(("metric", "spike", "expected"), [
    ("nll", 46.0, ["symlog"] * 4), ("nll", 2.5, []), ("accuracy", 46.0, ["log", "log"])])
def test_plot_comparison_sets_the_scales(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metric: str, spike: float,
                                         expected: list[str]) -> None:
    scales: list[str] = []
    original = Axes.set_yscale

    def spy(self: Axes, value: str, **kwargs: Any) -> None:
        scales.append(value)
        original(self, value, **kwargs)

    monkeypatch.setattr(Axes, "set_yscale", spy)
    runs = [_record("snopt", metric, [3.0, spike, 1.4]), _record("adam", metric, [3.0, 2.0, 1.4])]
    out = plot_comparison(runs, tmp_path / "p.png")
    assert out == [tmp_path / "p.png"] and out[0].stat().st_size > 0
    assert scales == expected


def test_a_peer_at_its_own_defaults_is_labelled_without_a_learning_rate(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # SOAP and PSGD-Kron run at their defaults: no learning rate is resolved (the demo's curves crashed on it)
    labels: list[str] = []
    original = Axes.plot

    def spy(self: Axes, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("label"):
            labels.append(kwargs["label"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    soap = _record("soap", "accuracy", [0.1, 0.5, 0.9])
    soap["resolved"]["lr"] = None
    plot_comparison([_record("snopt", "accuracy", [0.1, 0.6, 0.9]), soap], tmp_path / "p.png")
    assert "snopt (lr 0.1)" in labels and "soap (its defaults)" in labels
