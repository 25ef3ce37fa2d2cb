"""Optimizers: SNOpt, Newton-CG (exact curvature products)."""

from snopt.optim._newton_cg import CGResult, NewtonCG, conjugate_gradient
from snopt.optim._snopt import SNOpt

__all__ = ["CGResult", "NewtonCG", "SNOpt", "conjugate_gradient"]
