"""Fixtures shared by tests/: the benchmark scripts, which are files run as scripts, loaded as modules."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    """benchmarks/`name`.py as a module, registered under `name`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gpu_bench() -> ModuleType:
    """benchmarks/gpu_bench.py as a module (its functions run on the CPU too)."""
    return _script("gpu_bench")
