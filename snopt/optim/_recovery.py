"""Step recovery: an optimizer step that breaks a solve is undone, the step is tightened, training goes on.

A step is *pending* from the moment `SNOpt.step` takes it until the next `step` finds finite
gradients (the forward and backward passes at the new parameters worked). While a step is
pending, a failure that those parameters cause is the step's fault, and `StepRecovery` undoes it:

* the forward solve of an `ODEBlock` raises `SolverError` or its initial state is not finite (the
  layers before it blew up; the block's `guard` absorbs either: the solve returns a placeholder,
  later solves of the same pass are skipped), or the model's output
  is not finite: when the model's forward returns, the step is undone and the forward pass is
  rerun at the restored parameters, and its output replaces the broken one — the user's loop
  sees a normal output;
* the adjoint backward solve raises `SolverError` (absorbed as NaN gradients), or the gradient
  is not finite: `SNOpt.step` undoes the previous step instead of taking a new one.

Undoing restores exactly what the step changed: the parameters, the base optimizer's state
(momentum buffers, moments, step counters, and the param-group entries the step itself wrote;
an LR scheduler's later edits are kept), SNOpt's second moments, eigenbases and step counter.
Gradients accumulated at the rejected parameters are dropped (set to None). Every later step
is then scaled by ``step_scale`` (×``shrink`` per rejection, regrowing by ×``regrow`` per
validated step up to 1): the whole parameter change Δθ becomes ``step_scale``·Δθ, and SGD's
momentum buffers are scaled with it. A failure with no pending step (the first iteration,
the rerun after an undo, parameters the user set) still raises the `SolverError`.

Cost: one copy of the parameters and of the optimizer state per step (a few fused copies),
and one finiteness check (a single host sync) per forward pass of the model while a step is
pending. Under DDP the ranks agree (one 1-element all-reduce per training forward pass; NaN
gradients reach every rank through DDP's own all-reduce), so all ranks undo the same step;
forward passes without grad (evaluation) are then not guarded.
"""

import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from snopt.adjoint._solve import SolverError
from snopt.optim._protocols import Undoable


class StepRejectedWarning(RuntimeWarning):
    """An optimizer step broke a solve (or made the loss non-finite) and was undone."""


@dataclass
class RecoveryStats:
    """What `StepRecovery` has done so far (``opt.recovery.stats``; saved in ``opt.state_dict()``).

    Attributes:
        rejected: Steps undone.
        forward_failures: Undone because a forward solve failed (SolverError).
        nonfinite_outputs: Undone because the model's output held NaN or inf.
        backward_failures: Undone because an adjoint backward solve failed (SolverError).
        nonfinite_gradients: Undone because the gradient held NaN or inf (backward failures excluded).
        step_scale: Factor on every step now (1 until a rejection; ×shrink per rejection, then
            regrowing by ×regrow per validated step).
        last_rejected: Index (0-based optimizer step count) of the last step undone, or None.
    """

    rejected: int = 0
    forward_failures: int = 0
    nonfinite_outputs: int = 0
    backward_failures: int = 0
    nonfinite_gradients: int = 0
    step_scale: float = 1.0
    last_rejected: int | None = None


_REASONS = {"forward": "forward_failures", "output": "nonfinite_outputs", "backward": "backward_failures",
            "gradient": "nonfinite_gradients"}
_WHY = {"forward": "a forward ODE solve failed", "output": "the model's output was not finite",
        "backward": "an adjoint backward ODE solve failed", "gradient": "the gradient was not finite"}


def _float_tensors(out: Any) -> Iterator[Tensor]:
    if isinstance(out, Tensor):
        if out.is_floating_point() or out.is_complex():
            yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _float_tensors(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _float_tensors(o)


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every tensor is finite, with one host synchronisation for all of them."""
    if not tensors:
        return True
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def _changed(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b))
    return bool(a != b)


class StepRecovery:
    """Undoes an `SNOpt` step that broke a solve (see the module docstring); the `StepGuard` of its blocks.

    Created by `SNOpt` (``recovery=True``, the default) and reachable as ``opt.recovery``; its
    `stats` count what happened. Not meant to be built by hand.

    Args:
        opt: The optimizer whose steps it guards.
        model: The model given to `opt` (its forward pass is rerun after an undo; for a
            DistributedDataParallel model, the wrapped module's).
        distributed: Whether the ranks of `group` must agree on every undo.
        group: The process group (None: the default group).
        shrink: Factor on `step_scale` per rejection, in (0, 1).
        regrow: Factor on `step_scale` per validated step, ≥ 1 (capped at 1).

    Raises:
        ValueError: If `shrink` or `regrow` is out of range.
    """

    def __init__(self, opt: Undoable, model: nn.Module, *, distributed: bool = False, group: Any = None,
                 shrink: float = 0.25, regrow: float = 1.02) -> None:
        if not 0.0 < shrink < 1.0:
            raise ValueError(f"Invalid shrink: {shrink} (must be in (0, 1))")
        if not regrow >= 1.0:
            raise ValueError(f"Invalid regrow: {regrow} (must be ≥ 1)")
        self.opt = opt
        self.distributed = distributed
        self.group = group
        self.shrink = shrink
        self.regrow = regrow
        self.stats = RecoveryStats()
        self.pending = False
        self._depth = 0
        self._tripped = False
        self._backward_failed = False
        self._warned = False
        self._params: list[Tensor] = [p for g in opt.param_groups for p in g["params"]]
        self._saved_params: list[Tensor] = []
        self._saved_base: dict[int, dict[str, Any]] = {}
        self._saved_snopt: dict[int, dict[str, Any]] = {}
        self._saved_groups: list[dict[str, Any]] = []
        self._group_undo: list[dict[str, Any]] = []
        self._saved_scalars: dict[str, Any] = {}
        root = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self._handles: list[RemovableHandle] = [
            root.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            root.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True)]

    # -- the StepGuard protocol (snopt.adjoint.StepGuard), called by the solves ----------------
    @property
    def tripped(self) -> bool:
        """Whether the current forward pass already absorbed a failure."""
        return self._tripped

    def forward_failed(self, err: SolverError) -> bool:
        """Absorb a failed forward solve when a step is pending and the model's forward can be rerun."""
        if not (self.pending and self._depth > 0 and self._may_guard_forward()):
            return False
        self._tripped = True
        return True

    def backward_failed(self, err: SolverError) -> bool:
        """Absorb a failed backward solve (its gradients become NaN) when a step is pending."""
        if not self.pending:
            return False
        self._backward_failed = True
        return True

    # -- model hooks ---------------------------------------------------------------------------
    def _may_guard_forward(self) -> bool:
        # Distributed, every rank must take part in the agreement: only training passes are in lockstep.
        return not self.distributed or torch.is_grad_enabled()

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._depth += 1

    def _post_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        self._depth -= 1
        if self._depth > 0:
            return None
        tripped, self._tripped = self._tripped, False
        if not self.pending or output is None or not self._may_guard_forward():
            return None
        reason = "forward" if tripped else ("" if all_finite(list(_float_tensors(output))) else "output")
        if self.distributed:
            reason = self._agree(reason)
        if not reason:
            return None
        self.reject(reason)
        return module(*args, **kwargs)  # nothing is pending now: a failure of this rerun raises

    def _agree(self, reason: str) -> str:
        # all ranks undo together when any rank failed (a forward failure outranks a non-finite output)
        codes = ("", "output", "forward")
        device = self._params[0].device if self._params else torch.device("cpu")
        code = torch.tensor([float(codes.index(reason))], device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self.group)
        return codes[int(code.item())]

    # -- snapshot, undo ------------------------------------------------------------------------
    def capture(self) -> None:
        """Remember what the coming step may change (called by `SNOpt.step` before it steps)."""
        self._params = [p for g in self.opt.param_groups for p in g["params"]]
        with torch.no_grad():
            if len(self._saved_params) != len(self._params) or any(
                    s.shape != p.shape or s.dtype != p.dtype or s.device != p.device
                    for s, p in zip(self._saved_params, self._params, strict=True)):
                self._saved_params = [torch.empty_like(p) for p in self._params]
            torch._foreach_copy_(self._saved_params, [p.detach() for p in self._params])
            self._saved_base = {i: self._copy_state(self.opt.base.state[p], self._saved_base.get(i))
                                for i, p in enumerate(self._params) if p in self.opt.base.state}
            self._saved_snopt = {
                i: self._copy_state(self.opt.state[layer.weight], self._saved_snopt.get(i), only=("m2",))
                for i, layer in enumerate(self.opt.layers) if layer.weight in self.opt.state}
        self._saved_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        self._saved_scalars = self.opt.counters()

    @staticmethod
    def _copy_state(state: dict[str, Any], old: dict[str, Any] | None,
                    only: tuple[str, ...] | None = None) -> dict[str, Any]:
        """A copy of one parameter's optimizer state.

        Tensors that a step updates in place (all, or the keys in `only`) are copied, into
        `old`'s buffers where they fit; the others are referenced.
        """
        out: dict[str, Any] = {}
        for k, v in state.items():
            if isinstance(v, Tensor) and (only is None or k in only):
                buf = old.get(k) if old is not None else None
                if isinstance(buf, Tensor) and buf.shape == v.shape and buf.dtype == v.dtype and buf.device == v.device:
                    out[k] = buf.copy_(v)
                else:
                    out[k] = v.detach().clone()
            else:
                out[k] = v
        return out

    def after_step(self) -> None:
        """Called by `SNOpt.step` once the base optimizer has stepped: scale the step, mark it pending."""
        self._group_undo = [{k: before[k] for k in before if k in g and _changed(g[k], before[k])}
                            for g, before in zip(self.opt.param_groups, self._saved_groups, strict=True)]
        s = self.stats.step_scale
        if s < 1.0:
            with torch.no_grad():
                torch._foreach_lerp_(self._params, self._saved_params, 1.0 - s)  # θ0 + s·(θ − θ0)
                for p in self._params:
                    buf = self.opt.base.state.get(p, {}).get("momentum_buffer")
                    if isinstance(buf, Tensor):
                        buf.mul_(s)
        self.pending = True
        self._backward_failed = False

    def validate(self) -> None:
        """The pending step worked (finite gradients at its parameters): let the step scale regrow."""
        if self.pending:
            self.stats.step_scale = min(1.0, self.stats.step_scale * self.regrow)
        self.pending = False

    def gradient_failure(self) -> bool:
        """`SNOpt.step` found a non-finite gradient: undo the pending step (True) or report there is none."""
        if not self.pending:
            return False
        self.reject("backward" if self._backward_failed else "gradient")
        return True

    def reject(self, reason: str) -> None:
        """Undo the pending step exactly, tighten every later step and count it (`reason`: see `_REASONS`)."""
        assert self.pending, "no step to undo"
        opt = self.opt
        with torch.no_grad():
            torch._foreach_copy_(self._params, self._saved_params)
            for i, p in enumerate(self._params):
                self._restore_state(opt.base.state, p, self._saved_base.get(i))
                p.grad = None  # gradients at the rejected parameters
            for i, layer in enumerate(opt.layers):
                self._restore_state(opt.state, layer.weight, self._saved_snopt.get(i))
        for g, undo in zip(opt.param_groups, self._group_undo, strict=True):
            g.update(undo)
        opt.restore_counters(self._saved_scalars)
        self.pending = False
        self._backward_failed = False
        self.stats.rejected += 1
        field = _REASONS[reason]
        setattr(self.stats, field, getattr(self.stats, field) + 1)
        self.stats.step_scale *= self.shrink
        step = int(self._saved_scalars.get("step", 0))
        self.stats.last_rejected = step
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"SNOpt step {step} was undone because {_WHY[reason]} at the parameters it produced; the "
                f"parameters and optimizer state are restored, and later steps are scaled by "
                f"{self.stats.step_scale:g} (regrowing). Training continues; this warning is shown once — "
                "`opt.recovery.stats` counts every undone step.", StepRejectedWarning, stacklevel=4)

    @staticmethod
    def _restore_state(state: dict[Tensor, Any], p: Tensor, saved: dict[str, Any] | None) -> None:
        if saved is None:
            state.pop(p, None)
            return
        cur = state.get(p, {})
        restored: dict[str, Any] = {}
        for k, v in saved.items():
            now = cur.get(k)
            if not isinstance(v, Tensor) or now is v:
                restored[k] = v  # a scalar, or a tensor the step did not replace (an eigenbasis between refreshes)
            elif isinstance(now, Tensor) and now.shape == v.shape and now.dtype == v.dtype and now.device == v.device:
                restored[k] = now.copy_(v)  # in place: the base optimizer may hold on to the tensor
            else:
                restored[k] = v.clone()
        state[p] = restored

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, the step scale and, while a step is pending, what undoing it needs (bit-identical resume)."""
        out: dict[str, Any] = {"stats": asdict(self.stats), "pending": self.pending,
                               "backward_failed": self._backward_failed, "warned": self._warned}
        if self.pending:
            out["snapshot"] = {
                "params": [t.clone() for t in self._saved_params],
                "base": {i: dict(s) for i, s in self._saved_base.items()},
                "snopt": {i: dict(s) for i, s in self._saved_snopt.items()},
                "group_undo": [dict(u) for u in self._group_undo], "scalars": dict(self._saved_scalars)}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned.

        Args:
            state: As returned by `state_dict`.
        """
        names = {f.name for f in fields(RecoveryStats)}
        self.stats = RecoveryStats(**{k: v for k, v in state["stats"].items() if k in names})
        self.pending = bool(state["pending"])
        self._backward_failed = bool(state.get("backward_failed", False))
        self._warned = bool(state.get("warned", False))
        snap = state.get("snapshot")
        if self.pending:
            if snap is None:
                raise ValueError("The recovery state says a step is pending but holds no snapshot of it.")
            self._saved_params = [t.to(p.device, p.dtype).clone() for t, p in zip(snap["params"], self._params,
                                                                                      strict=True)]
            self._saved_base = {int(i): self._to(s, self._params[int(i)]) for i, s in snap["base"].items()}
            self._saved_snopt = {int(i): self._to(s, self.opt.layers[int(i)].weight) for i, s in snap["snopt"].items()}
            self._group_undo = [dict(u) for u in snap["group_undo"]]
            self._saved_scalars = dict(snap["scalars"])

    @staticmethod
    def _to(state: dict[str, Any], like: Tensor) -> dict[str, Any]:
        return {k: v.to(like.device).clone() if isinstance(v, Tensor) else v for k, v in state.items()}

    def remove(self) -> None:
        """Detach the model hooks (undoing then covers backward failures and non-finite gradients only)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


__all__ = ["RecoveryStats", "StepRecovery", "StepRejectedWarning", "all_finite"]
