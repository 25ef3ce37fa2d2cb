"""Without the optional extras the suite still collects, and what needs them skips (issue #36.4)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("matplotlib", "tqdm", "sktime", "sklearn", "plotnine", "pytorch_optimizer", "pytest_benchmark")
BLOCKER = f"""
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocker())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def _pytest_without_extras(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER, "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)


def test_the_suite_collects_without_the_extras() -> None:
    res = _pytest_without_extras("--collect-only", "tests", "verification")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "error" not in res.stdout.lower().split("collected")[-1]


def test_tests_that_need_an_extra_skip_without_it() -> None:
    res = _pytest_without_extras("-rs", "tests/test_data.py", "tests/test_benchmark_protocol.py", "-k",
                                 "uea or tabular or digits or plot or write")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "could not import 'sklearn'" in res.stdout and "could not import 'matplotlib'" in res.stdout
