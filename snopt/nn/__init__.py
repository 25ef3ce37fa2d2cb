"""Neural ODE building blocks."""

from snopt.nn._ode_block import ODEBlock

__all__ = ["ODEBlock"]
