"""snopt's pytest plugin: the reference checks as fixtures, a float64 marker, reproducible profiles.

Installed with snopt (entry point ``pytest11``, name ``snopt``), so it is active in any pytest run
of an environment that has snopt; ``pytest -p no:snopt`` turns it off. It changes nothing on its
own: every effect is asked for by a test.

* Fixture ``snopt_check``: a `SnoptCheck` whose ``second_order(...)`` / ``products(...)`` check
  that snopt's adjoints give *your* vector field exact curvature (against `GridReference`, at
  step h and h/2; the rtol is ``--snopt-rtol``, default 1e-4).
* Marker ``@pytest.mark.snopt_float64``: the test runs with torch's default dtype float64 (build
  the model inside the test), restored afterwards even if it fails. Reference checks in float32
  only see round-off.
* Fixture ``snopt_seed``: seeds torch's global generator (and `random`) with ``--snopt-seed``
  (default 0) before the test and returns the seed, so a failure replays exactly.
* Hypothesis profiles ``snopt-ci`` (8 derandomized examples, no deadline, health check for slow
  data off: solves are slow) and ``snopt-thorough`` (60), registered when hypothesis is installed:
  ``pytest --hypothesis-profile snopt-ci``.
* The report header names snopt's, torch's and torchdiffeq's versions and torch's threads.

Example (a user's test file):
    >>> import pytest, torch  # doctest: +SKIP
    >>> @pytest.mark.snopt_float64
    ... def test_my_field_has_exact_curvature(snopt_check, snopt_seed):
    ...     field = MyField()  # forward(t, x)
    ...     snopt_check.second_order(field, torch.randn(2, 3), torch.tensor([0.0, 1.0]), my_loss,
    ...                              step_size=1 / 32, wrt_t1=True)
"""

import importlib.metadata
import importlib.util
import random
from collections.abc import Iterator

import pytest

from snopt.testing._check import SnoptCheck

PROFILES = {"snopt-ci": 8, "snopt-thorough": 60}
"""Hypothesis profiles this plugin registers: name → max_examples (all derandomized, no deadline)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--snopt-seed`` and ``--snopt-rtol``."""
    group = parser.getgroup("snopt", "snopt's correctness references")
    group.addoption("--snopt-seed", type=int, default=0, help="seed of the snopt_seed fixture (default 0)")
    group.addoption("--snopt-rtol", type=float, default=1e-4,
                    help="relative tolerance of the snopt_check fixture on the finer grid (default 1e-4)")


@pytest.hookimpl(tryfirst=True)  # before hypothesis' own plugin loads --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    """Register the marker and, if hypothesis is installed, the profiles."""
    config.addinivalue_line("markers", "snopt_float64: run the test with torch's default dtype float64 "
                                       "(restored afterwards)")
    if importlib.util.find_spec("hypothesis") is not None:
        from hypothesis import HealthCheck, settings

        for name, examples in PROFILES.items():
            settings.register_profile(name, max_examples=examples, derandomize=True, deadline=None,
                                      print_blob=True, suppress_health_check=[HealthCheck.too_slow])


def pytest_report_header(config: pytest.Config) -> str:
    """One line: the versions a correctness report depends on."""
    import torch

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return (f"snopt {version('snopt')}, torch {torch.__version__} (threads: {torch.get_num_threads()}), "
            f"torchdiffeq {version('torchdiffeq')}")


@pytest.fixture(autouse=True)
def _snopt_float64(request: pytest.FixtureRequest) -> Iterator[None]:
    """Apply the ``snopt_float64`` marker (a no-op for tests without it)."""
    if request.node.get_closest_marker("snopt_float64") is None:
        yield
        return
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def snopt_seed(request: pytest.FixtureRequest) -> int:
    """Seed torch's global generator and `random` with ``--snopt-seed``; return the seed."""
    import torch

    seed = int(request.config.getoption("--snopt-seed"))
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture
def snopt_check(request: pytest.FixtureRequest) -> SnoptCheck:
    """A `SnoptCheck` at ``--snopt-rtol`` that raises AssertionError with its report on a failing block."""
    return SnoptCheck(rtol=float(request.config.getoption("--snopt-rtol")))
