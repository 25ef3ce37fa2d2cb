"""Kronecker-factored curvature of SNOpt: per-layer factors, eigenbases and the eigen-corrected update.

Pure functions on tensors (no hooks, no optimizer state): `_layers` turns a layer's input
and output cotangent into the matrices ā and g, `_kron` folds them into time-integrated
factors A and G, and `_eigen` builds the eigenbasis and the preconditioned update.
"""

from snopt.curvature._collector import FactorCollector
from snopt.curvature._eigen import (
    CurvatureWarning,
    EigenBasis,
    EigenRefresh,
    eigenbases,
    eigenbasis,
    init_second_moment,
    init_second_moments,
    precondition,
    precondition_,
    project_eigenvalues,
    rotate,
    unrotate,
)
from snopt.curvature._ggn import ggn_factors, hessian_roots
from snopt.curvature._kron import (
    KronFactors,
    ReduceAccumulator,
    TimeSharing,
    VecOrder,
    Weight,
    accumulate_,
    blend_factors,
    kron_block,
    time_average,
)
from snopt.curvature._layers import (
    KronLayer,
    is_kron_layer,
    layer_dims,
    layer_inputs,
    layer_output_grads,
    set_weight_grad_matrix,
    weight_grad_matrix,
)

__all__ = [
    "CurvatureWarning",
    "EigenBasis",
    "EigenRefresh",
    "FactorCollector",
    "KronFactors",
    "KronLayer",
    "ReduceAccumulator",
    "TimeSharing",
    "VecOrder",
    "Weight",
    "accumulate_",
    "eigenbases",
    "eigenbasis",
    "ggn_factors",
    "hessian_roots",
    "init_second_moment",
    "init_second_moments",
    "is_kron_layer",
    "kron_block",
    "layer_dims",
    "layer_inputs",
    "layer_output_grads",
    "precondition",
    "precondition_",
    "project_eigenvalues",
    "rotate",
    "set_weight_grad_matrix",
    "blend_factors",
    "time_average",
    "unrotate",
    "weight_grad_matrix",
]
