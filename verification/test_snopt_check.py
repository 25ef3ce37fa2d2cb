"""Claim: `SnoptCheck` (the pytest plugin's ``snopt_check``) passes snopt on every field kind at its default rtol.

The check's order test asks each block's error against `GridReference` to shrink ≥ 8× when the
rk4 step halves (or to sit at round-off), and its default rtol 1e-4 bounds the finer grid's
error. Drawn problems of every kind `snopt.testing` has (MLP, conv, affine, linear; spans of
4–8 steps of 1/32, either direction, weight scales up to 1.5) must pass, so a user's correct
field is not failed by the check; test_second_order_mutation.py shows that each dropped term
of the adjoint fails it.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from snopt.testing import SecondOrderProblem, SnoptCheck
from snopt.testing.strategies import second_order_problems
from verification.test_second_order import _fraction

STEP = 1 / 32
PROBLEMS = st.one_of(
    second_order_problems("mlp", lattice=1 / 16, min_units=2, max_units=4),
    second_order_problems("conv", lattice=1 / 16, min_units=2, max_units=3, max_batch=2, max_dim=2, max_width=2),
    second_order_problems("affine", lattice=1 / 16, min_units=2, max_units=4),
    second_order_problems("linear", lattice=1 / 16, min_units=2, max_units=4),
)


@settings(max_examples=_fraction(6))
@given(PROBLEMS)
def test_snopt_passes_its_own_check_on_drawn_fields(case: SecondOrderProblem) -> None:
    func, x0, t_span, loss_fn = case.build()
    report = SnoptCheck().second_order(func, x0, t_span, loss_fn, step_size=STEP, wrt_t1=True)
    assert all(b.ratio >= 8 or b.fine <= b.floor for b in report.blocks), str(report)


@settings(max_examples=_fraction(3))
@given(PROBLEMS)
def test_the_products_pass_it_too(case: SecondOrderProblem) -> None:
    func, x0, t_span, loss_fn = case.build()
    SnoptCheck().products(func, x0, t_span, loss_fn, step_size=STEP)
