"""A 2-D CNF's density grid in the record: a density (integrates to one), laid out as documented, and plotted."""

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.apps import RunConfig
from benchmarks.apps._cnf import CNFTask
from benchmarks.apps._common import resolve
from benchmarks.apps._plots import plot_densities
from benchmarks.apps._runner import compare, task_defaults, train

pytest.importorskip("sklearn")  # the optional extras (`pip install snopt[experiments]`)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _task(dataset: str, **options: Any) -> CNFTask:
    cfg = RunConfig(task="cnf", dataset=dataset, optimizer="adam",
                    options={"hidden": 8, "n_train": 300, "n_test": 300, **options})
    return CNFTask(cfg, resolve(cfg, task_defaults(cfg)), torch.device("cpu"))


def test_the_grid_holds_a_density_that_integrates_to_one() -> None:
    """Change of variables through the (untrained, near-Gaussian) flow: the grid's Riemann sum of p is ~1."""
    torch.manual_seed(0)
    task = _task("8gaussians")
    d = task.final_outputs(grid=64, points=50)["density"]
    x, y, logp = d["x"], d["y"], d["log_p"]
    assert len(x) == len(y) == 64 and len(logp) == 64 and all(len(row) == 64 for row in logp)
    # the box holds every training and test point, with a margin
    data = torch.cat([task.x_train, task.x_test])
    assert x[0] < float(data[:, 0].min()) and x[-1] > float(data[:, 0].max())
    assert y[0] < float(data[:, 1].min()) and y[-1] > float(data[:, 1].max())
    cell = (x[1] - x[0]) * (y[1] - y[0])
    mass = sum(math.exp(v) for row in logp for v in row) * cell
    assert abs(mass - 1.0) < 0.02, mass
    assert len(d["points"]) == 50 and d["points"][0] == [round(float(v), 4) for v in task.x_test[0]]


def test_rows_are_x2_and_columns_x1() -> None:
    """log_p[j][i] is log p at (x[i], y[j]): checked against the model at two off-diagonal grid points."""
    torch.manual_seed(1)
    task = _task("moons")
    d = task.final_outputs(grid=12, points=10)["density"]
    task.model.field.divergence = "exact"
    for i, j in ((2, 9), (9, 2)):
        point = torch.tensor([[d["x"][i], d["y"][j]]], dtype=task.x_train.dtype)
        with torch.no_grad():
            want = float(task.model(point, rtol=task.eval_tol[0], atol=task.eval_tol[1]))
        assert abs(d["log_p"][j][i] - want) < 1e-3
    assert abs(d["log_p"][2][9] - d["log_p"][9][2]) > 1e-3  # the two points differ, so the test can tell


def test_only_2d_runs_that_did_not_diverge_carry_a_density() -> None:
    assert _task("wine").final_outputs() == {}
    tiny: dict[str, Any] = {"hidden": 4, "n_train": 100, "n_test": 100}
    r = train(RunConfig(task="cnf", dataset="circles", optimizer="adam", iterations=2, eval_every=1,
                        batch_size=32, options=tiny))
    assert len(r["density"]["log_p"]) == 48 and len(r["density"]["points"]) == 200  # test, then training points
    assert "density" not in train(RunConfig(task="cnf", dataset="wine", optimizer="adam", iterations=2,
                                            eval_every=1, batch_size=32, options=tiny))
    blown = train(RunConfig(task="cnf", dataset="circles", optimizer="sgd", iterations=3, eval_every=1,
                            batch_size=32, lr=1e9, options=tiny))
    assert blown["diverged"] is not None and "density" not in blown


def _record(optimizer: str, seed: int, value: float) -> dict[str, Any]:
    return {"config": {"optimizer": optimizer, "seed": seed}, "resolved": {"lr": 0.1},
            "task": {"name": "cnf", "dataset": "toy"}, "summary": {"iterations_done": 5},
            "evals": {"test_metric": [3.0, value]},
            "density": {"x": [-1.0, 0.0, 1.0], "y": [-1.0, 1.0], "log_p": [[-2.0, -1.0, None], [-3.0, -1.5, -2.0]],
                        "points": [[0.0, 0.5], [0.2, -0.1]]}}


def test_plot_densities_draws_one_panel_per_optimizer_and_skips_runs_without_one(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = [_record("adam", 1, 2.0), _record("snopt", 0, 1.5), _record("adam", 0, 2.5),
            {"config": {"optimizer": "sgd", "seed": 0}}]
    out = plot_densities(runs, tmp_path / "d.png")
    assert out == [tmp_path / "d.png"] and out[0].read_bytes().startswith(PNG_MAGIC)
    assert plot_densities([{"config": {"optimizer": "sgd", "seed": 0}}], tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()


def test_compare_writes_the_density_plot_for_a_2d_cnf_only(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    tiny: dict[str, Any] = {"hidden": 4, "n_train": 100, "n_test": 100}
    base = RunConfig(task="cnf", dataset="moons", iterations=2, eval_every=1, batch_size=32, options=tiny)
    res = compare(base, ["adam", "sgd"], [0], out_dir=tmp_path / "moons", echo=None)
    assert str(tmp_path / "moons" / "cnf-moons_density.png") in res["files"]
    assert (tmp_path / "moons" / "cnf-moons_density.png").read_bytes().startswith(PNG_MAGIC)
    res = compare(RunConfig(task="cnf", dataset="wine", iterations=2, eval_every=1, batch_size=32, options=tiny),
                  ["adam"], [0], out_dir=tmp_path / "wine", echo=None)
    assert not any(f.endswith("_density.png") for f in res["files"])
