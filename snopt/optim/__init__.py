"""Optimizers: SNOpt, Newton-CG (exact curvature products), the integration-time controller."""

from snopt.optim._horizon import HorizonController, HorizonDerivatives, horizon_derivatives
from snopt.optim._newton_cg import CGResult, NewtonCG, conjugate_gradient
from snopt.optim._recovery import RecoveryStats, StepRecovery, StepRejectedWarning
from snopt.optim._snopt import SNOpt

__all__ = ["CGResult", "HorizonController", "HorizonDerivatives", "NewtonCG", "RecoveryStats", "SNOpt",
           "StepRecovery", "StepRejectedWarning", "conjugate_gradient", "horizon_derivatives"]
