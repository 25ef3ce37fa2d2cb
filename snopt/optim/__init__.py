"""Optimizers: SNOpt, Newton-CG (exact curvature products), the integration-time controller."""

from snopt.optim._horizon import HorizonController, HorizonDerivatives, horizon_derivatives
from snopt.optim._newton_cg import CGResult, NewtonCG, conjugate_gradient
from snopt.optim._snopt import SNOpt

__all__ = ["CGResult", "HorizonController", "HorizonDerivatives", "NewtonCG", "SNOpt", "conjugate_gradient",
           "horizon_derivatives"]
