"""snopt: verified second-order training of Neural ODEs at O(1) memory."""

from snopt import losses, optim
from snopt.adjoint import (
    AdjointObserver,
    FieldOutputError,
    NonFiniteStateError,
    SecondOrderResult,
    SolverError,
    SolveStats,
    ggn_vp,
    hvp,
    odeint,
    second_order,
)
from snopt.nn import ODEBlock
from snopt.optim import SNOpt

__version__ = "0.1.0"

__all__ = [
    "AdjointObserver",
    "FieldOutputError",
    "ODEBlock",
    "SNOpt",
    "SecondOrderResult",
    "SolveStats",
    "NonFiniteStateError",
    "SolverError",
    "__version__",
    "ggn_vp",
    "hvp",
    "losses",
    "odeint",
    "optim",
    "second_order",
]
