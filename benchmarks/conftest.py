"""Collect `bench_*.py` files as test modules (`pytest benchmarks --benchmark-only`).

pyproject's `python_files` is left at pytest's default (`test_*.py`), so the benchmark
suites, named `bench_*.py` to keep them out of the test run, are collected here.
"""

from pathlib import Path

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        module: pytest.Module = pytest.Module.from_parent(parent, path=file_path)
        return module
    return None
