"""Fixtures shared by tests/: the benchmark scripts, which are files, not an importable package."""

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from snopt.experiments._runner import summarize

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    """benchmarks/`name`.py as a module, registered under `name` (so sibling scripts can import it)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """benchmarks/run_applications.py as a module (registered, so run_fashion.py can import it)."""
    return _script("run_applications")


@pytest.fixture(scope="module")
def fashion(bench: ModuleType) -> ModuleType:
    """benchmarks/run_fashion.py as a module (after `bench`, which registers the run_applications it imports)."""
    return _script("run_fashion")


@pytest.fixture(scope="module")
def tabular(bench: ModuleType) -> ModuleType:
    """benchmarks/run_cnf_tabular.py as a module (after `bench`, which registers the run_applications it imports)."""
    return _script("run_cnf_tabular")


@pytest.fixture(scope="module")
def ratios(bench: ModuleType) -> ModuleType:
    """benchmarks/plot_ratios.py as a module (after `bench`, which registers the run_applications it imports)."""
    return _script("plot_ratios")


@pytest.fixture(scope="module")
def gpu_bench() -> ModuleType:
    """benchmarks/gpu_bench.py as a module (its functions run on the CPU too)."""
    return _script("gpu_bench")


def _continued(t: dict[str, Any], iterations: int) -> dict[str, Any]:
    """Run record `t` continued to `iterations` at its own cost per iteration (both clocks), reaching both targets
    at its last evaluation: a stand-in for a `--decide` run of the same seed."""
    n, extra = len(t["history"]["iteration"]), iterations - len(t["history"]["iteration"])
    hist = {k: v + v[-1:] * extra for k, v in t["history"].items()}
    for clock in ("time", "cpu_time"):
        hist[clock] = [t["history"][clock][-1] * (i + 1) / n for i in range(iterations)]
    ev = {k: v + v[-1:] for k, v in t["evals"].items()}
    ev["iteration"][-1], ev["cpu_time"][-1], ev["time"][-1] = float(iterations), hist["cpu_time"][-1], hist["time"][-1]
    ev["train_loss"][-1], ev["test_metric"][-1] = 0.01, 0.99
    rec = {**t, "config": {**t["config"], "iterations": iterations}, "history": hist, "evals": ev}
    return {**rec, "summary": summarize(rec)}


@pytest.fixture
def continue_run() -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """`_continued`: a protocol run's record continued to more iterations, reaching both targets at the end."""
    return _continued
