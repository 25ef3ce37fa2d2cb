"""snopt as the correctness reference in your own tests: exact references, tolerances, memory checks.

Everything here is independent of snopt's adjoint code, so it can check snopt, or your own
second-order code, against derivatives that are exact by construction:

* **References** (DESIGN.md §5). `GridReference`: `torch.func` derivatives of a fixed-grid
  discretisation (euler, midpoint, rk4 as torchdiffeq steps them) of L = Φ(x(t1)) for any vector
  field ``forward(t, x)``: loss, gradients, the Hessian blocks θθ, x0x0, x0θ, the t1 derivatives
  (`second_order`, laid out as `snopt.SecondOrderResult`), `hvp`, `ggn_vp`, `ggn`.
  `ClosedFormReference`: the same for dx/dt = A x + b via `matrix_exp`. Lower level: `rk_solve`,
  `linear_solution`, and `backprop_grads` / `backprop_hessian` through plain torchdiffeq (adaptive
  solvers).
* **Assertions.** `assert_close` and the block-wise `assert_second_order_close` compare norm-wise
  and report the block, the relative error, the tolerance and its source, and the worst entries.
  `default_tolerance` is the policy (√eps of the dtype, or 1e4 × an adaptive solver's rtol).
* **Your field.** `SnoptCheck`: snopt's second-order adjoints (`second_order`, `hvp`, `ggn_vp`) for
  *your* vector field against `GridReference` at steps h and h/2: each block must be within rtol
  and shrink at the method's order (a missing term does not shrink), with a `ConvergenceReport`.
* **pytest plugin** (`snopt.testing.pytest_plugin`, loaded automatically; ``-p no:snopt``): the
  ``snopt_check`` and ``snopt_seed`` fixtures, the ``snopt_float64`` marker, the hypothesis
  profiles ``snopt-ci`` / ``snopt-thorough`` and a report header with the versions.
* **Memory.** `saved_tensor_bytes` and `assert_memory_flat` count the bytes autograd saves for
  backward, which an O(1)-memory adjoint keeps flat in the number of solver steps.
* **Problems.** Seeded specs of small fields and losses (`SecondOrderProblem`, `OdeintProblem`, ...);
  the hypothesis strategies that draw them are in `snopt.testing.strategies`, which needs the
  optional dependency hypothesis (``pip install snopt[testing]``); this package does not.

Example:
    >>> import snopt
    >>> from snopt.testing import GridReference, SecondOrderProblem, assert_second_order_close
    >>> func, x0, t_span, loss_fn = SecondOrderProblem("mlp", 2, 4, "tanh", True, 3, 0.0, 0.5, "ce", 0).build()
    >>> mine = snopt.second_order(func, x0, t_span, loss_fn, method="rk4", options={"step_size": 1 / 64})
    >>> exact = GridReference(func, x0, t_span, loss_fn, step_size=1 / 64).second_order()
    >>> assert_second_order_close(mine, exact, rtol=1e-6)
"""

import importlib
from types import ModuleType

from snopt.testing._check import BlockConvergence, ConvergenceReport, SnoptCheck
from snopt.testing._compare import (
    SECOND_ORDER_BLOCKS,
    SOLVER_FACTOR,
    Tolerance,
    assert_close,
    assert_second_order_close,
    default_tolerance,
    rel_err,
    second_order_errors,
)
from snopt.testing._memory import SavedTensorBytes, SavedTensorMeter, assert_memory_flat, saved_tensor_bytes
from snopt.testing._problems import (
    ACTIVATIONS,
    FIELD_KINDS,
    AffineField,
    ConvField,
    FieldSpec,
    LinearSpec,
    MLPField,
    OdeintProblem,
    SecondOrderProblem,
)
from snopt.testing._references import (
    GRID_METHODS,
    LinearField,
    backprop_grads,
    backprop_hessian,
    flat_params,
    linear_solution,
    param_dict,
    rk_solve,
    steps_for,
)
from snopt.testing._second_order import ClosedFormReference, GridReference


def __getattr__(name: str) -> ModuleType:
    """Import `snopt.testing.strategies` on first access (it needs hypothesis; this package does not)."""
    if name == "strategies":
        return importlib.import_module("snopt.testing.strategies")
    raise AttributeError(f"module 'snopt.testing' has no attribute {name!r}")


__all__ = [
    # exact references
    "ClosedFormReference",
    "GridReference",
    "GRID_METHODS",
    # does snopt give your field exact curvature? (also the pytest plugin's snopt_check fixture)
    "BlockConvergence",
    "ConvergenceReport",
    "SnoptCheck",
    "LinearField",
    "backprop_grads",
    "backprop_hessian",
    "flat_params",
    "linear_solution",
    "param_dict",
    "rk_solve",
    "steps_for",
    # agreement and tolerances
    "SECOND_ORDER_BLOCKS",
    "SOLVER_FACTOR",
    "Tolerance",
    "assert_close",
    "assert_second_order_close",
    "default_tolerance",
    "rel_err",
    "second_order_errors",
    # memory
    "SavedTensorBytes",
    "SavedTensorMeter",
    "assert_memory_flat",
    "saved_tensor_bytes",
    # small problems (strategies: snopt.testing.strategies)
    "ACTIVATIONS",
    "FIELD_KINDS",
    "AffineField",
    "ConvField",
    "FieldSpec",
    "LinearSpec",
    "MLPField",
    "OdeintProblem",
    "SecondOrderProblem",
]
