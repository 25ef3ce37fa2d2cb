"""Optimizers: Newton-CG (exact curvature products), SNOpt, the integration-time controller."""

from snopt.optim._newton_cg import CGResult, NewtonCG, conjugate_gradient

__all__ = ["CGResult", "NewtonCG", "conjugate_gradient"]
