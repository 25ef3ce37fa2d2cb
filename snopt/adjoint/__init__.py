"""Adjoint ODE solves: first order (`odeint`) and second order (`second_order`, `hvp`, `ggn_vp`)."""

from snopt._checks import NonFiniteStateError
from snopt.adjoint._field import Field, FieldOutputError
from snopt.adjoint._hvp import ggn_vp, hvp
from snopt.adjoint._observer import AdjointObserver, SolveStats, StepGuard
from snopt.adjoint._odeint import odeint
from snopt.adjoint._second_order import SecondOrderResult, second_order
from snopt.adjoint._solve import SolverError

__all__ = ["AdjointObserver", "Field", "FieldOutputError", "NonFiniteStateError", "SecondOrderResult", "SolveStats",
           "SolverError", "StepGuard", "ggn_vp", "hvp", "odeint", "second_order"]
