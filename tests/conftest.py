"""Fixtures shared by tests/: the benchmark scripts, which are files, not an importable package."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """benchmarks/run_applications.py as a module (registered, so run_fashion.py can import it)."""
    spec = importlib.util.spec_from_file_location("run_applications", ROOT / "benchmarks" / "run_applications.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_applications"] = mod
    spec.loader.exec_module(mod)
    return mod
