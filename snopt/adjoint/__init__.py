"""Adjoint ODE solves: first order (`odeint`) and, later, second order."""

from snopt.adjoint._field import Field, FieldOutputError
from snopt.adjoint._observer import AdjointObserver, SolveStats
from snopt.adjoint._odeint import odeint
from snopt.adjoint._solve import SolverError

__all__ = ["AdjointObserver", "Field", "FieldOutputError", "SolveStats", "SolverError", "odeint"]
