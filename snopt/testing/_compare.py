"""Agreement with a reference: the relative error, a tolerance policy and assertions that explain a mismatch.

Agreement is norm-wise (DESIGN.md §5): a value passes when ‖actual − expected‖ ≤ atol +
rtol · ‖expected‖, with the 2-norm over all entries. Entry-wise tests (``torch.allclose``) are
too strict for derivative blocks whose small entries carry the large relative errors of any
discretisation, and too weak to catch an error spread evenly over many entries.

**Default tolerance** (`default_tolerance`), for the less precise dtype of the two values:

* rtol = √eps(dtype): 1.5e-8 for float64, 3.5e-4 for float32. Rounding errors of a solve and its
  derivatives accumulate over the steps and are amplified by the conditioning of the flow; √eps
  leaves room for that while still failing on any wrong term (those give errors ≳ 1e-3).
* With ``solver_rtol`` (the adaptive solver's rtol) the rule is rtol = max(√eps, 1e4 · solver_rtol):
  the global error of an adaptive solve is C · rtol with C = O(exp(‖F_x‖ T)), and derivatives whose
  accumulators are left out of the error control (snopt's ``norm="seminorm"``) were measured up to
  ~1e3 · rtol away from the closed form, so 1e4 bounds C for O(1)-Lipschitz fields over O(1) spans.
* atol = 0: an absolute error has the units of the compared block (a Hessian, a gradient, ∂L/∂t1),
  so no scale-free default exists. Pass one when a reference can be (near) zero.

Fixed-grid comparisons against `GridReference` differ by the method's truncation error
(O(h⁴) for rk4), which neither rule knows: pass ``rtol`` explicitly there.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from snopt.adjoint import SecondOrderResult

TensorTree = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
Blocks = SecondOrderResult | Mapping[str, Tensor | None]
PerBlock = float | Mapping[str, float] | None

SOLVER_FACTOR = 1e4
"""How far above an adaptive solver's rtol the default tolerance lies (see the module docstring)."""
SECOND_ORDER_BLOCKS = ("loss", "grad_params", "grad_x0", "hess_params", "hess_x0", "hess_x0_params",
                       "grad_t1", "hess_t1", "hess_t1_params")
"""The fields of `snopt.SecondOrderResult` that `assert_second_order_close` compares, in report order."""


# ----------------------------------------------------------------------------------------------
# The agreement measure
# ----------------------------------------------------------------------------------------------

def _leaves(tree: TensorTree) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [tree[k] for k in sorted(tree)]
    return list(tree)


def rel_err(a: TensorTree, b: TensorTree, *, tiny: float = 1e-300) -> float:
    """Relative error ‖a − b‖ / max(‖b‖, tiny), the 2-norm over all entries.

    Args:
        a: The value under test: a tensor, a sequence of tensors or a dict of tensors.
        b: The reference, with the same structure (dicts are matched by key).
        tiny: Floor of the denominator, so that a zero reference gives the absolute error.

    Returns:
        The relative error as a Python float (computed in float64, outside autograd).

    Raises:
        ValueError: If the structures, keys or shapes differ.
    """
    if isinstance(a, Mapping) and isinstance(b, Mapping) and sorted(a) != sorted(b):
        raise ValueError(f"Keys differ: {sorted(a)} vs {sorted(b)}.")
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"Structures differ: {len(la)} vs {len(lb)} tensors.")
    num = 0.0
    den = 0.0
    with torch.no_grad():
        for x, y in zip(la, lb, strict=True):
            if x.shape != y.shape:
                raise ValueError(f"Shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}.")
            x64, y64 = x.detach().to(torch.float64), y.detach().to(torch.float64)
            num += float((x64 - y64).pow(2).sum())
            den += float(y64.pow(2).sum())
    rel: float = num ** 0.5 / max(den ** 0.5, tiny)
    return rel


# ----------------------------------------------------------------------------------------------
# Tolerance policy
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    """A norm-wise tolerance: pass when ‖actual − expected‖ ≤ atol + rtol · ‖expected‖.

    Attributes:
        rtol: Relative part.
        atol: Absolute part, in the units of the compared value's norm.
        source: How it was chosen (shown in mismatch reports).
    """

    rtol: float
    atol: float = 0.0
    source: str = "given"

    def __post_init__(self) -> None:
        if not (self.rtol >= 0 and self.atol >= 0 and math.isfinite(self.rtol) and math.isfinite(self.atol)):
            raise ValueError(f"`rtol` and `atol` must be finite and non-negative; got {self.rtol}, {self.atol}.")

    def allows(self, error_norm: float, expected_norm: float) -> bool:
        """Whether an error of norm `error_norm` passes against a reference of norm `expected_norm`."""
        return error_norm <= self.atol + self.rtol * expected_norm

    def describe(self) -> str:
        """``rtol …, atol …`` and where they came from."""
        return f"rtol {self.rtol:.1e}, atol {self.atol:.1e} ({self.source})"


def default_tolerance(dtype: torch.dtype, *, solver_rtol: float | None = None) -> Tolerance:
    """The default tolerance for values of `dtype`, optionally from an adaptive solver's rtol.

    rtol = max(√eps(dtype), 1e4 · solver_rtol) and atol = 0 (the module docstring gives the reasons).

    Args:
        dtype: A floating dtype (the less precise one of the two compared values).
        solver_rtol: The rtol the compared value was solved with, if adaptive.

    Returns:
        The `Tolerance`.

    Raises:
        TypeError: If `dtype` is not a floating dtype.
        ValueError: If `solver_rtol` is negative or not finite.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"`dtype` must be a floating dtype; got {dtype}.")
    rtol = math.sqrt(torch.finfo(dtype).eps)
    source = f"√eps of {dtype}"
    if solver_rtol is not None:
        if not (solver_rtol >= 0 and math.isfinite(solver_rtol)):
            raise ValueError(f"`solver_rtol` must be finite and non-negative; got {solver_rtol}.")
        if SOLVER_FACTOR * solver_rtol > rtol:
            rtol, source = SOLVER_FACTOR * solver_rtol, f"1e4 × solver rtol {solver_rtol:g}"
    return Tolerance(rtol=rtol, atol=0.0, source=f"default: {source}")


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    fa = a if a.is_floating_point else torch.float64
    fb = b if b.is_floating_point else torch.float64
    return fa if torch.finfo(fa).eps >= torch.finfo(fb).eps else fb


def _tolerance(actual: Tensor, expected: Tensor, rtol: float | None, atol: float | None,
               solver_rtol: float | None) -> Tolerance:
    default = default_tolerance(_coarser(actual.dtype, expected.dtype), solver_rtol=solver_rtol)
    if rtol is None and atol is None:
        return default
    source = "given" if rtol is not None else f"given atol, rtol {default.source}"
    return Tolerance(rtol=default.rtol if rtol is None else rtol, atol=0.0 if atol is None else atol, source=source)


# ----------------------------------------------------------------------------------------------
# Assertions
# ----------------------------------------------------------------------------------------------

def _as_tensor(x: Tensor | float, name: str, what: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, (int, float)):
        return torch.tensor(float(x), dtype=torch.float64)
    raise TypeError(f"`{what}` of {name!r} must be a tensor or a number; got {type(x).__name__}.")


def _index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))


def _mismatch(name: str, actual: Tensor, expected: Tensor, tol: Tolerance, max_entries: int) -> str | None:
    """None if `actual` passes, else the report for this value."""
    if actual.shape != expected.shape:
        return f"{name}: shape {tuple(actual.shape)} differs from the reference's {tuple(expected.shape)}"
    a = actual.to(torch.float64).reshape(-1)
    e = expected.to(torch.float64).reshape(-1)
    diff = (a - e).abs()
    err, ref = float(diff.norm()), float(e.norm())
    finite = bool(torch.isfinite(a).all())
    if finite and tol.allows(err, ref):
        return None
    rel = err / ref if ref > 0 else math.inf
    lines = [f"{name} {tuple(actual.shape)}: relative error {rel:.3e} "
             f"(‖actual − expected‖ {err:.3e}, ‖expected‖ {ref:.3e}) exceeds {tol.describe()}"
             + ("" if finite else "; actual holds non-finite entries")]
    if a.numel() > 0:
        order = torch.nan_to_num(diff, nan=math.inf).argsort(descending=True)[:max_entries]
        lines.append(f"  worst {len(order)} of {a.numel()} entries (index: actual vs expected, |diff|):")
        for i in order.tolist():
            idx = _index(i, actual.shape) if actual.ndim else ()
            lines.append(f"    {idx}: {float(a[i]): .10e} vs {float(e[i]): .10e}, {float(diff[i]):.2e}")
    return "\n".join(lines)


def assert_close(actual: Tensor | float, expected: Tensor | float, *, rtol: float | None = None,
                 atol: float | None = None, solver_rtol: float | None = None, name: str = "value",
                 max_entries: int = 5) -> None:
    """Assert ‖actual − expected‖ ≤ atol + rtol · ‖expected‖, with a report naming the worst entries.

    Args:
        actual: The value under test (a tensor, or a number).
        expected: The reference, of the same shape.
        rtol: Relative tolerance; default from `default_tolerance`.
        atol: Absolute tolerance on the error's 2-norm; default 0.
        solver_rtol: The adaptive solver's rtol behind `actual`, for the default rtol.
        name: What is compared (first word of the report).
        max_entries: How many of the largest entry-wise differences the report lists.

    Raises:
        AssertionError: If the values differ by more than the tolerance, hold non-finite entries
            or differ in shape; the message gives the relative error, the tolerance and where it
            came from, and the worst entries with their indices and values.
    """
    a, e = _as_tensor(actual, name, "actual"), _as_tensor(expected, name, "expected")
    report = _mismatch(name, a, e, _tolerance(a, e, rtol, atol, solver_rtol), max_entries)
    if report is not None:
        raise AssertionError(f"{name} differs from the reference:\n{report}")


def _blocks(obj: Blocks) -> dict[str, Tensor]:
    if isinstance(obj, SecondOrderResult):
        found = {k: getattr(obj, k) for k in SECOND_ORDER_BLOCKS}
    elif isinstance(obj, Mapping):
        found = dict(obj)
    else:
        raise TypeError(f"Expected a snopt.SecondOrderResult or a mapping of blocks; got {type(obj).__name__}.")
    return {k: v for k, v in found.items() if v is not None}


def _pick(value: PerBlock, key: str) -> float | None:
    if isinstance(value, Mapping):
        return value.get(key)
    return value


def _compared(got: dict[str, Tensor], ref: dict[str, Tensor], blocks: Sequence[str] | None) -> list[str]:
    keys = [k for k in SECOND_ORDER_BLOCKS if k in got] if blocks is None else list(blocks)
    keys += [k for k in got if k not in keys and k not in SECOND_ORDER_BLOCKS and blocks is None]
    for k in keys:
        if k not in got:
            raise ValueError(f"The result has no block {k!r}: it holds {sorted(got)}.")
        if k not in ref:
            hint = " (build the reference with wrt_t1=True)" if "t1" in k else ""
            raise ValueError(f"The reference has no block {k!r}{hint}: it holds {sorted(ref)}.")
    return keys


def second_order_errors(result: Blocks, reference: Blocks, *, blocks: Sequence[str] | None = None
                        ) -> dict[str, float]:
    """`rel_err` of every block of `result` against `reference`.

    Args:
        result: A `snopt.SecondOrderResult` (or a mapping from block names to tensors).
        reference: The same, e.g. from `GridReference.second_order()`.
        blocks: The blocks to compare; default every block `result` holds (its t1 blocks only
            with ``wrt_t1=True``).

    Returns:
        Block name → relative error. Blocks are compared after reshaping to the reference's shape.

    Raises:
        ValueError: If a requested block is missing from either.
    """
    got, ref = _blocks(result), _blocks(reference)
    return {k: rel_err(got[k].reshape(ref[k].shape), ref[k]) for k in _compared(got, ref, blocks)}


def assert_second_order_close(result: Blocks, reference: Blocks, *, rtol: PerBlock = None, atol: PerBlock = None,
                              solver_rtol: float | None = None, blocks: Sequence[str] | None = None,
                              name: str = "second_order", max_entries: int = 5) -> None:
    """Assert every block of `result` agrees with `reference`; the report names each failing block.

    Each block is checked as by `assert_close` (norm-wise, its own ‖expected‖), and all
    failures are reported at once, followed by the relative errors of the blocks that passed.

    Args:
        result: A `snopt.SecondOrderResult` (or a mapping from block names to tensors).
        reference: The same, e.g. from `GridReference.second_order()` or
            `ClosedFormReference.second_order()`.
        rtol: One relative tolerance for all blocks, or a mapping block → rtol (blocks left out
            get the default of `default_tolerance`).
        atol: One absolute tolerance (on each block's error norm), or a mapping; default 0.
        solver_rtol: The adaptive solver's rtol behind `result`, for the default rtol.
        blocks: The blocks to compare; default every block `result` holds.
        name: What is compared (first word of the report).
        max_entries: How many of the largest entry-wise differences each block's report lists.

    Raises:
        AssertionError: If any block differs by more than its tolerance; the message names the
            block, its relative error and tolerance, and its worst entries.
        ValueError: If a requested block is missing from either.
    """
    got, ref = _blocks(result), _blocks(reference)
    keys = _compared(got, ref, blocks)
    failures: list[str] = []
    passed: list[str] = []
    for k in keys:
        a, e = got[k].detach(), ref[k].detach()
        a = a.reshape(e.shape) if a.numel() == e.numel() else a
        tol = _tolerance(a, e, _pick(rtol, k), _pick(atol, k), solver_rtol)
        report = _mismatch(k, a, e, tol, max_entries)
        if report is None:
            passed.append(f"{k} {rel_err(a, e):.1e}")
        else:
            failures.append(report)
    if failures:
        summary = f"\npassed (relative error): {', '.join(passed)}" if passed else ""
        raise AssertionError(f"{name}: {len(failures)} of {len(keys)} blocks differ from the reference:\n"
                             + "\n".join(failures) + summary)
