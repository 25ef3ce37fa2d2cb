"""snopt: verified second-order training of Neural ODEs at O(1) memory."""

from snopt.adjoint import AdjointObserver, FieldOutputError, SolverError, SolveStats, odeint

__version__ = "0.1.0"

__all__ = ["AdjointObserver", "FieldOutputError", "SolveStats", "SolverError", "__version__", "odeint"]
