"""snopt's pytest plugin and `SnoptCheck`, the convergence check it exposes as the ``snopt_check`` fixture.

`SnoptCheck` is tested against planted errors whose size we choose: a constant relative error
(what a wrong or missing term looks like: it does not shrink with h) must fail even when it is
below rtol, a C·h⁴ error (what rk4's truncation looks like) must pass, and a large error must fail
on rtol. The plugin is tested through pytester: in-process for the fixtures and the marker, in a
subprocess for what changes global state (hypothesis profiles) or the plugin set (``-p no:snopt``).
"""

import dataclasses
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import snopt
from snopt.testing import MLPField, SnoptCheck
from snopt.testing import _check as check_module

pytest_plugins = ["pytester"]

SPAN = torch.tensor([0.0, 0.5], dtype=torch.float64)
STEP = 1 / 16


def problem(seed: int = 0) -> tuple[MLPField, Tensor, Callable[[Tensor], Tensor]]:
    torch.manual_seed(seed)
    field = MLPField(2, 3, "tanh", True, torch.float64)
    return field, torch.randn(2, dtype=torch.float64), lambda x: (x ** 2).sum() + x.prod()


def test_snopt_passes_on_every_block_with_the_methods_order() -> None:
    field, x0, loss_fn = problem()
    report = SnoptCheck().second_order(field, x0, SPAN, loss_fn, step_size=STEP, wrt_t1=True)
    assert report.ok and len(report.blocks) == 9
    shrinking = [b for b in report.blocks if b.fine > b.floor]
    assert {b.name for b in shrinking} >= {"grad_params", "hess_params", "hess_t1"}
    assert all(12 < b.ratio < 20 for b in shrinking), str(report)  # rk4: 2⁴ per halving
    products = SnoptCheck().products(field, x0, SPAN, loss_fn, step_size=STEP)
    assert products.ok and [b.name for b in products.blocks] == ["hvp", "ggn_vp"]


def planted(monkeypatch: pytest.MonkeyPatch, error: Callable[[float], float]) -> None:
    """Make snopt.second_order's hess_params the grid reference's times (1 + error(h))."""
    def fake(func: Any, x0: Tensor, t_span: Tensor, loss_fn: Any, **kw: Any) -> snopt.SecondOrderResult:
        h = kw["options"]["step_size"]
        ref = check_module.GridReference(func, x0, t_span, loss_fn, method=kw["method"], step_size=h).second_order(
            wrt_t1=False)
        return dataclasses.replace(ref, hess_params=ref.hess_params * (1 + error(h)), grad_t1=None, hess_t1=None,
                                   hess_t1_params=None)

    monkeypatch.setattr(check_module, "second_order", fake)


def test_a_constant_error_below_rtol_fails_for_not_converging(monkeypatch: pytest.MonkeyPatch) -> None:
    planted(monkeypatch, lambda h: 1e-8)
    field, x0, loss_fn = problem()
    with pytest.raises(AssertionError) as info:
        SnoptCheck(rtol=1e-6).second_order(field, x0, SPAN, loss_fn, step_size=STEP)
    msg = str(info.value)
    assert "1 of 6 blocks fail" in msg
    assert "hess_params: 1.00e-08 → 1.00e-08 (×1.0) FAILS: shrank ×1.00 < ×8" in msg, msg


def test_an_error_of_rk4_order_passes_and_a_large_one_fails_on_rtol(monkeypatch: pytest.MonkeyPatch) -> None:
    field, x0, loss_fn = problem()
    planted(monkeypatch, lambda h: 0.1 * h ** 4)
    report = SnoptCheck().second_order(field, x0, SPAN, loss_fn, step_size=STEP)
    (hess,) = [b for b in report.blocks if b.name == "hess_params"]
    assert hess.ok and hess.ratio == pytest.approx(16, rel=1e-6)
    planted(monkeypatch, lambda h: 1e4 * h ** 4)  # converges, but 9.5e-3 on the finer grid
    report = SnoptCheck(raise_on_failure=False).second_order(field, x0, SPAN, loss_fn, step_size=STEP)
    assert report.failed == ["hess_params"]
    assert "FAILS: above rtol 1e-04" in str(report)


def test_float32_counts_round_off_as_converged() -> None:
    torch.manual_seed(0)
    field = MLPField(2, 3, "tanh", True, torch.float32)
    x0, span = torch.randn(2), SPAN.float()
    report = SnoptCheck(raise_on_failure=False).second_order(field, x0, span, lambda x: (x ** 2).sum(), step_size=STEP)
    floor = 1e3 * torch.finfo(torch.float32).eps
    assert all(b.floor == floor and b.rtol == floor for b in report.blocks)
    assert report.ok, str(report)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"step_size": 0.1, "t_span": torch.tensor([0.0, 0.3], dtype=torch.float64)}, "must divide the span"),
    ({"step_size": -0.5}, "positive and finite"),
    ({"step_size": STEP, "method": "dopri5"}, "fixed-grid methods"),
    ({"step_size": STEP, "t_span": torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)}, "two times"),
])
def test_bad_input_is_refused_clearly(kwargs: dict[str, Any], match: str) -> None:
    field, x0, loss_fn = problem()
    t_span = kwargs.pop("t_span", SPAN)
    with pytest.raises(ValueError, match=match):
        SnoptCheck().second_order(field, x0, t_span, loss_fn, **kwargs)


def test_bad_direction_and_rtol_are_refused() -> None:
    field, x0, loss_fn = problem()
    with pytest.raises(ValueError, match=r"`v` must have shape \(20,\)"):
        SnoptCheck().products(field, x0, SPAN, loss_fn, torch.ones(3, dtype=torch.float64), step_size=STEP)
    with pytest.raises(ValueError, match="`rtol` must be positive"):
        SnoptCheck(rtol=0.0)


USER_TESTS = '''
import random

import pytest
import torch
from snopt.testing import MLPField


@pytest.mark.snopt_float64
def test_marker_sets_float64():
    assert torch.get_default_dtype() == torch.float64


def test_without_marker_dtype_is_untouched():
    assert torch.get_default_dtype() == torch.float32


def test_seed_replays(snopt_seed):
    drawn = (torch.rand(3), random.random())
    torch.manual_seed(snopt_seed)
    random.seed(snopt_seed)
    assert snopt_seed == 7 and torch.equal(drawn[0], torch.rand(3)) and drawn[1] == random.random()


@pytest.mark.snopt_float64
def test_fixture_checks_my_field(snopt_check):
    assert snopt_check.rtol == 1e-5
    field = MLPField(2, 4, "silu", False, torch.float64)
    report = snopt_check.second_order(field, torch.randn(3, 2), torch.tensor([0.0, 0.25]),
                                      lambda x: x.tanh().sum(), step_size=1 / 16)
    assert report.ok
'''


def test_plugin_fixtures_and_marker_in_process(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    before = torch.get_default_dtype()
    result = pytester.runpytest("-p", "no:cacheprovider", "--snopt-seed", "7", "--snopt-rtol", "1e-5")
    result.assert_outcomes(passed=4)
    assert torch.get_default_dtype() == before


def test_marker_restores_the_dtype_after_a_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_fails=textwrap.dedent('''
        import pytest

        @pytest.mark.snopt_float64
        def test_boom():
            raise RuntimeError("boom")
    '''))
    before = torch.get_default_dtype()
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(failed=1)
    assert torch.get_default_dtype() == before


def test_header_profiles_and_opt_out_in_a_subprocess(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_profile=textwrap.dedent('''
        from hypothesis import given, settings, strategies as st

        def test_profile_is_loaded():
            assert settings.get_current_profile_name() == "snopt-ci"
            assert settings.default.max_examples == 8 and settings.default.derandomize

        def test_uses_fixture(snopt_check):
            assert snopt_check.rtol == 1e-4
    '''))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hypothesis-profile", "snopt-ci")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"snopt {snopt.__version__}, torch {torch.__version__} (threads: *), torchdiffeq *"])
    off = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:snopt",
                                        "test_profile.py::test_uses_fixture")
    off.assert_outcomes(errors=1)
    off.stdout.fnmatch_lines(["*fixture 'snopt_check' not found*"])


def test_the_readme_plugin_example_runs_as_a_user_test_file(pytester: pytest.Pytester) -> None:
    from tests.test_readme import BLOCKS

    (example,) = [b for b in BLOCKS if "snopt_check" in b]
    pytester.makepyfile(test_readme_example=example)
    result = pytester.runpytest("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*hess_params: * → * (×1?.?) ok*"])
