"""Gathering Kronecker factors from the evaluations the adjoint already makes.

`FactorCollector` attaches plain `torch.nn` forward hooks to every nn.Linear / nn.Conv2d
of a module. When a layer's output takes part in a backward computation, a tensor hook
on that output receives the cotangent g, paired with the layer input a of the same call.

Two modes:

- ``"ode"`` (layers inside an ODE block's vector field): the collector is the block's
  `AdjointObserver`. It keeps only the latest (a, g) per layer and folds it into the
  factors with weight dt when the backward solve reports an accepted step — a Riemann
  sum over the steps the adjoint takes anyway: no extra function evaluations, nothing
  stored per step. Calls made while no backward pass needs them (the forward solve,
  under no-grad) cost one flag check.
- ``"static"`` (ordinary layers, for ``full_precond``): every call during the ordinary
  backward pass is folded with weight 1 (a layer called several times shares its weight
  across calls: "expand").

Scaling (DESIGN.md §2): g is multiplied by the batch size B (the leading dimension of
the layer input: the loss is taken to be a batch mean, so B·g is the per-sample
cotangent) and by sqrt(L) for L locations per sample (so G sums over locations while A
averages). Then, for one datum at one location with ā, g constant in time,
A ⊗ G = vec(∇W) vec(∇W)ᵀ of the per-sample gradient (empirical Fisher), exactly.
"""

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from snopt.curvature._kron import KronFactors, ReduceAccumulator, TimeSharing, accumulate_
from snopt.curvature._layers import is_kron_layer, layer_dims, layer_inputs, layer_output_grads


class FactorCollector:
    """Collects A and G for every Linear/Conv2d inside `module` (see module docstring).

    Args:
        module: The module to watch (an ODE block's vector field, or a whole model).
        mode: ``"ode"`` (fold on accepted backward steps) or ``"static"`` (fold every call).
        exclude: Modules not to watch (e.g. layers handled by another collector).
        time_sharing: ``"expand"`` (each time sample × batch × location a data point) or
            ``"reduce"`` (per sample and location, ā averaged and g integrated over time
            before the outer products; ``"ode"`` mode only).
        cotangent: ``"batch_mean"`` (default: g is the cotangent of a batch-mean loss and is
            multiplied by B·sqrt(L), giving the empirical Fisher of the per-sample losses) or
            ``"sum"`` (g multiplied by sqrt(B·L) only, so G = ∫ Σ_{b,l} g gᵀ dt: what a
            Gauss-Newton root cotangent needs, see `ggn_factors`).

    Attributes:
        factors: Layer name → accumulated `KronFactors` (created on first data).
        enabled: Collection on/off; off costs one check per layer call.
        batch_size: Largest leading dimension of a layer input folded since the last reset (the
            batch size B; layers fed a broadcast input, e.g. a CNF's (1, 1) time input, see 1).
    """

    def __init__(self, module: nn.Module, *, mode: Literal["ode", "static"] = "ode",
                 exclude: set[nn.Module] | None = None,
                 time_sharing: TimeSharing | str = TimeSharing.EXPAND,
                 cotangent: Literal["batch_mean", "sum"] = "batch_mean") -> None:
        if mode not in ("ode", "static"):
            raise ValueError(f"`mode` must be 'ode' or 'static'; got {mode!r}.")
        if cotangent not in ("batch_mean", "sum"):
            raise ValueError(f"`cotangent` must be 'batch_mean' or 'sum'; got {cotangent!r}.")
        self.cotangent = cotangent
        self.time_sharing = TimeSharing(time_sharing)
        if self.time_sharing is TimeSharing.REDUCE and mode != "ode":
            raise ValueError("time_sharing='reduce' needs mode='ode' (there is no time to reduce over otherwise).")
        self._reduce: dict[str, ReduceAccumulator] = {}
        self.grid_h: float | None = None
        self.grid_t0 = 0.0
        skip = exclude or set()
        self.mode = mode
        self.layers: dict[str, nn.Module] = {
            name: m for name, m in module.named_modules() if is_kron_layer(m) and m not in skip}
        self.factors: dict[str, KronFactors] = {}
        self.enabled = False
        self.batch_size = 1
        self._latest: dict[str, tuple[Tensor, Tensor]] = {}
        self._handles: list[RemovableHandle] = [
            m.register_forward_hook(self._forward_hook(name)) for name, m in self.layers.items()]

    def __iter__(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(self.layers.items())

    def remove(self) -> None:
        """Detach every hook (the collector collects nothing afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.enabled = False

    def reset(self) -> None:
        """Zero the factors (keeping their memory) and forget the latest evaluations."""
        for f in self.factors.values():
            f.reset_()
        for r in self._reduce.values():
            r.reset_()
        self._latest.clear()
        self.batch_size = 1

    def kron_factors(self) -> dict[str, KronFactors]:
        """The accumulated factors per layer (finalised from the running sums in "reduce" mode)."""
        if self.time_sharing is TimeSharing.EXPAND:
            return dict(self.factors)
        return {name: acc.finalize() for name, acc in self._reduce.items() if bool(acc.weight > 0)}

    def _forward_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.enabled or not isinstance(output, Tensor) or not output.requires_grad:
                return
            a = inputs[0].detach()

            def on_grad(g: Tensor) -> None:
                if not self.enabled:  # switched off between the forward and this backward pass
                    return
                if self.mode == "ode":
                    self._latest[name] = (a, g.detach())
                else:
                    self._fold(name, module, a, g.detach(), 1.0)

            output.register_hook(on_grad)  # type: ignore[no-untyped-call]
        return hook

    def _fold(self, name: str, module: nn.Module, a: Tensor, g: Tensor, weight: float | Tensor) -> None:
        a_bar = layer_inputs(module, a)
        g_rows = layer_output_grads(module, g)
        b = a.shape[0] if a.ndim > 1 else 1
        self.batch_size = max(self.batch_size, b)
        locations = g_rows.shape[0] / b
        if name not in self.factors:
            d_in, d_out = layer_dims(module)
            self.factors[name] = KronFactors.zeros(d_in, d_out, dtype=a_bar.dtype, device=a_bar.device)
        scale = b * math.sqrt(locations) if self.cotangent == "batch_mean" else math.sqrt(b * locations)
        if self.time_sharing is TimeSharing.REDUCE:
            if name not in self._reduce:
                d_in, d_out = layer_dims(module)
                self._reduce[name] = ReduceAccumulator(d_in, d_out, dtype=a_bar.dtype, device=a_bar.device)
            acc = self._reduce[name]
            acc.add_(a_bar.reshape(b, -1, a_bar.shape[1]), (g_rows * scale).reshape(b, -1, g_rows.shape[1]), weight)
            return
        accumulate_(self.factors[name], a_bar, g_rows * scale, weight)

    def on_backward_step(self, t: Tensor, dt: Tensor) -> None:
        """Fold the latest (a, g) of every layer with weight dt (the `AdjointObserver` protocol).

        With a sampling grid (``grid_h``), only evaluations on the grid t0 + k·h are folded,
        with weight h.
        """
        if not self.enabled:
            return
        weight: Tensor | float = dt.abs()
        if self.grid_h is not None:
            k = float((t - self.grid_t0) / self.grid_h)
            if abs(k - round(k)) > 1e-6:
                self._latest.clear()
                return
            weight = self.grid_h
        for name, (ai, gi) in self._latest.items():
            self._fold(name, self.layers[name], ai, gi, weight)
        self._latest.clear()


def total_locations(module: nn.Module, a: Tensor) -> int:
    """Number of rows `layer_inputs` gives per sample (1 for Linear on (B, d))."""
    rows = layer_inputs(module, a).shape[0]
    return max(1, rows // max(1, a.shape[0]))


__all__ = ["FactorCollector", "total_locations", "torch"]
