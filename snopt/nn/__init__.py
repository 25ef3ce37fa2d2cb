"""Neural ODE building blocks: the ODE layer, its stiffness regularisers, continuous normalizing flows."""

from snopt.nn._cnf import (
    CNF,
    CNFField,
    ConcatSquashLinear,
    ConcatSquashNet,
    DivergenceField,
    cnf_log_density,
    cnf_sample,
    standard_normal_logprob,
)
from snopt.nn._ode_block import ODEBlock
from snopt.nn._regularized import RegularizedField, regularization

__all__ = ["CNF", "CNFField", "ConcatSquashLinear", "ConcatSquashNet", "DivergenceField", "ODEBlock",
           "RegularizedField", "cnf_log_density", "cnf_sample", "regularization", "standard_normal_logprob"]
