"""Deterministic memory checks: the bytes autograd saves for backward, against the number of solver steps.

Everything autograd keeps for backward passes through `torch.autograd.graph.saved_tensors_hooks`.
`SavedTensorMeter` counts those bytes: its pack hook stores ``t.detach()`` (storing ``t`` itself
would keep the graph alive, and any adjoint would look O(N)) and counts ``numel · element_size``;
the packed object's finaliser subtracts them again when autograd frees it. So it reports both what
a forward pass leaves for backward and the peak of what is alive at once during forward + backward,
the same number on every run and machine (unlike RSS).

The hooks see only tensors saved by autograd: not solver internals outside the graph, and not
`torch.func` transforms (which do not run saved-tensor hooks); measure those by peak RSS in a fresh
process.
"""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import torch
from torch import Tensor


class SavedTensorMeter:
    """Context manager counting the bytes autograd saves for backward while it is active.

    Attributes:
        live: Bytes currently held by saved tensors packed inside the context.
        peak: Maximum of `live`.
        total: All bytes ever packed.

    Example:
        >>> with SavedTensorMeter() as meter:  # doctest: +SKIP
        ...     loss = loss_fn(snopt.odeint(func, x0, t)[-1])
        ...     kept = meter.live
        ...     loss.backward()
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.total = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor) -> "_Packed":
        return _Packed(t, self)

    @staticmethod
    def _unpack(p: "_Packed") -> Tensor:
        return p.tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._ctx.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._ctx.__exit__(et, ev, tb)


class _Packed:
    """One saved tensor: stored detached, its bytes counted while it is alive."""

    def __init__(self, t: Tensor, meter: SavedTensorMeter) -> None:
        self.tensor = t.detach()
        self.nbytes = t.numel() * t.element_size()
        self.meter = meter
        meter.total += self.nbytes
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


@dataclass(frozen=True)
class SavedTensorBytes:
    """What `saved_tensor_bytes` measured.

    Attributes:
        retained: Bytes saved for backward that are still alive when the forward returns.
        peak: The most bytes alive at once during forward and backward.
        total: All bytes ever saved.
    """

    retained: int
    peak: int
    total: int


def saved_tensor_bytes(fn: Callable[[], Tensor], *, backward: bool = True) -> SavedTensorBytes:
    """Count the bytes autograd saves while `fn` computes a loss and (by default) while it is back-propagated.

    Args:
        fn: Computes a scalar loss that requires grad (e.g. ``lambda: loss_fn(snopt.odeint(...)[-1])``).
            Build inputs that need gradients inside it or before; what it saves is counted.
        backward: Also run ``loss.backward()`` inside the meter (so `peak` covers the backward).

    Returns:
        The `SavedTensorBytes`.

    Raises:
        ValueError: If `fn` does not return a scalar tensor that requires grad.
        AssertionError: If saved tensors outlive the backward pass (e.g. a graph kept alive
            elsewhere), which would make the count meaningless.
    """
    with SavedTensorMeter() as meter:
        loss = fn()
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError("`fn` must return a scalar tensor that requires grad (the loss to back-propagate).")
        retained = meter.live
        if backward:
            loss.backward()  # type: ignore[no-untyped-call]
    del loss
    if backward and meter.live != 0:
        raise AssertionError(f"{meter.live} saved bytes are still alive after backward: something keeps the "
                             "graph (retain_graph=True, or a tensor holding it); the count would be wrong.")
    return SavedTensorBytes(retained=retained, peak=meter.peak, total=meter.total)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def assert_memory_flat(make_loss: Callable[[int], Tensor], steps: Sequence[int] = (10, 100, 1000), *,
                       rtol: float = 0.1, atol_bytes: int = 0) -> dict[int, SavedTensorBytes]:
    """Assert the saved-for-backward bytes do not grow with the number of solver steps.

    For each count in `steps`, ``make_loss(count)`` runs inside a `SavedTensorMeter` and is
    back-propagated; the bytes retained after the forward and the peak during forward and
    backward must each stay within ``(1 + rtol) × smallest + atol_bytes`` over all counts.
    O(1)-memory adjoints pass; backprop through the solver (bytes ∝ steps) fails unless rtol
    approaches the ratio of the step counts.

    Args:
        make_loss: Given a number of steps, computes the scalar loss with that many solver steps
            (e.g. ``method="rk4", options={"step_size": 1 / count}``).
        steps: The step counts, at least two.
        rtol: Allowed relative growth.
        atol_bytes: Allowed absolute growth, in bytes.

    Returns:
        The measurement for each step count.

    Raises:
        AssertionError: If either count grows by more than allowed; the message lists the bytes
            for every step count.
        ValueError: For fewer than two step counts or a negative allowance.
    """
    if len(steps) < 2 or any(int(n) < 1 for n in steps):
        raise ValueError(f"`steps` must hold at least two positive step counts; got {tuple(steps)}.")
    if rtol < 0 or atol_bytes < 0:
        raise ValueError(f"`rtol` and `atol_bytes` must be non-negative; got {rtol}, {atol_bytes}.")
    found: dict[int, SavedTensorBytes] = {}
    for count in (int(n) for n in steps):
        found[count] = saved_tensor_bytes(functools.partial(make_loss, count))
    problems = []
    for what in ("retained", "peak"):
        values = {n: getattr(m, what) for n, m in found.items()}
        low = min(values.values())
        if max(values.values()) > (1 + rtol) * low + atol_bytes:
            table = ", ".join(f"{n} steps: {_mib(v)}" for n, v in values.items())
            problems.append(f"{what} saved bytes grow with the number of steps ({table}; allowed "
                            f"{_mib(int((1 + rtol) * low + atol_bytes))}, rtol {rtol:g}, atol {atol_bytes} bytes)")
    if problems:
        raise AssertionError("memory is not flat in the number of solver steps:\n  " + "\n  ".join(problems))
    return found
