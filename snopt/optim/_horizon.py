"""`HorizonController`: second-order optimisation of an `ODEBlock`'s integration horizon t1.

The horizon is an architecture choice that the paper (Liu et al. 2021, §3.3) optimises jointly
with θ. With the objective J(θ, t1) = L(θ, t1) + ρ t1²/2 and the quadratic model

    Q(δθ, δt) = Q_t δt + ½ Q_tt δt² + δt Q_tθ δθ (+ terms in δθ only),

the minimising δt given the parameter step δθ just taken is the *feedback* policy

    δt1 = −(Q_t + Q_tθ δθ) / Q_tt,   Q_t = ∂L/∂t1 + ρ t1,  Q_tt = ∂²L/∂t1² + ρ,  Q_tθ = ∂²L/∂t1∂θ.

Policies:

* ``"feedback"``: the rule above (to first order it is Newton's step on t1 at the *new* θ + δθ).
* ``"open_loop"``: δt1 = −Q_t / Q_tt (drops Q_tθ δθ; Newton's step at the old θ).
* ``"gradient"``: δt1 = −Q_t (first-order baseline); every step is scaled by `lr`.

Where the derivatives come from (``curvature``):

* ``"gauss_newton"`` (for ordinary training loops, any model size). ∂L/∂t1 is exact, for the
  whole training loss including downstream layers: with y = x(t1) the block output and ∂L/∂y its
  gradient in ``loss.backward()`` (caught by a tensor hook), ∂L/∂t1 = (∂L/∂y)ᵀF(t1, y) — the very
  expression `snopt.odeint`'s adjoint returns as dL/dt1 when t requires grad (tests/ check the
  two agree), at the cost of one extra vector-field evaluation per step and without making
  ``block.t1`` require grad. Q_tt is the outer-product (Gauss-Newton / empirical-Fisher)
  estimate ρ + E_b[(∂ℓ_b/∂t1)²] from the per-sample time derivatives
  ∂ℓ_b/∂t1 = B·(∂L/∂y_b)ᵀF(t1, y_b) (this assumes the loss is a batch *mean* and the vector
  field acts per sample; if the block runs several times per iteration only the last call
  counts). Q_tθ δθ is the rank-one outer-product
  estimate (∂L/∂t1)·(∇_θL · δθ), with ∇_θL recorded when backward accumulates it (before an
  optimizer such as `SNOpt` rewrites ``.grad``) and δθ the change of `params` since the forward
  pass. This is the paper's estimate with its scaling defects fixed (REFERENCE.md §1); it is
  an approximation, exactly like the paper's, and it is *not* what the convergence claims of
  the verification tree rest on.
* ``"exact"`` (small models: dense second-order adjoints). Each `step` is given a
  `HorizonDerivatives` (from `horizon_derivatives`, i.e. ``snopt.second_order(...,
  wrt_t1=True)``): exact ∂L/∂t1, ∂²L/∂t1² and the vector ∂²L/∂t1∂θ, so Q_tθ δθ is the exact
  product with the step taken since the derivatives were evaluated. verification/ checks these
  against torch.func through a discretisation whose grid moves with t1 and a closed form.

Statistics are running averages (bias-corrected exponential moving averages with decay `beta`)
of ∂L/∂t1, ∂²L/∂t1² and of the scalar Q_tθ δθ over the iterations since the last update
(each iteration's Q_tθ δθ pairs that iteration's derivatives with the step taken after them);
every `update_freq` steps t1 moves and the averages restart, because they describe the old t1.
The penalty terms ρ t1 and ρ are added at update time (t1 is constant within a window).

Safeguards: the curvature used is max(|Q_tt|, damping) (a negative exact curvature gives a
descent step, not an ascent one); a step is limited to ``max_rel_step·(t1 − t0)``; t1 is
clamped to [min_t1, max_t1]. A step whose derivatives are not finite is skipped with a
`RuntimeWarning` (they do not enter the averages, and no update is made at that step).
"""

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from snopt._types import LossFn
from snopt.adjoint._second_order import SecondOrderResult, second_order
from snopt.nn._ode_block import ODEBlock

Policy = Literal["feedback", "open_loop", "gradient"]
Curvature = Literal["gauss_newton", "exact"]
POLICIES: tuple[str, ...] = ("feedback", "open_loop", "gradient")
CURVATURES: tuple[str, ...] = ("gauss_newton", "exact")
_STATS = ("q_t", "q_tt", "q_tdtheta")


@dataclass(frozen=True)
class HorizonDerivatives:
    """Exact derivatives of the loss L (without the penalty) with respect to t1, at (θ, t1).

    Attributes:
        grad_t1: ∂L/∂t1.
        hess_t1: ∂²L/∂t1².
        hess_t1_params: ∂²L/∂t1∂θ, a flat (p,) vector (θ in `parameters()` order, trainable only).
        theta: The flat θ at which they were evaluated (so δθ = θ_now − theta), or None; the
            ``"feedback"`` policy needs it.
    """

    grad_t1: float
    hess_t1: float
    hess_t1_params: Tensor
    theta: Tensor | None = None

    @classmethod
    def from_second_order(cls, result: SecondOrderResult, params: Iterable[Tensor] | None = None
                          ) -> "HorizonDerivatives":
        """Build from ``snopt.second_order(..., wrt_t1=True)``.

        Args:
            result: A `SecondOrderResult` computed with ``wrt_t1=True``.
            params: The parameters θ it differentiated (their current values are recorded as
                `theta`; call this before the parameter step). None records no θ.

        Returns:
            The `HorizonDerivatives`.

        Raises:
            ValueError: When `result` has no t1 derivatives.
        """
        if result.grad_t1 is None or result.hess_t1 is None or result.hess_t1_params is None:
            raise ValueError("`result` has no t1 derivatives: call snopt.second_order(..., wrt_t1=True).")
        theta = None if params is None else _flat([p.detach() for p in params])
        return cls(grad_t1=float(result.grad_t1), hess_t1=float(result.hess_t1),
                   hess_t1_params=result.hess_t1_params.detach().reshape(-1), theta=theta)


def _flat(tensors: list[Tensor]) -> Tensor:
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.reshape(-1) for t in tensors])


def _trainable(block: ODEBlock) -> list[Tensor]:
    return [p for p in block.func.parameters() if p.requires_grad]


def horizon_derivatives(block: ODEBlock, x0: Tensor, loss_fn: LossFn, *, method: str | None = None,
                        rtol: float | None = None, atol: float | None = None,
                        options: dict[str, Any] | None = None) -> HorizonDerivatives:
    """Exact ∂L/∂t1, ∂²L/∂t1², ∂²L/∂t1∂θ of L = loss_fn(block(x0)) by second-order adjoints.

    Calls ``snopt.second_order(block.func, x0, (t0, t1), loss_fn, wrt_t1=True)`` (dense
    (n + p)² blocks: small models only) and records the current θ of ``block.func``, for a
    `HorizonController` with ``curvature="exact"``. θ is the trainable parameters of
    ``block.func``; parameters that `loss_fn` closes over (downstream layers) are constants here,
    so their cross-derivatives with t1 are not included.

    Args:
        block: The `ODEBlock`.
        x0: The block's input.
        loss_fn: Maps the block output x(t1) to a scalar loss (without the t1 penalty).
        method: Solver (default: the block's).
        rtol: Relative tolerance (default: the block's).
        atol: Absolute tolerance (default: the block's).
        options: Solver options (default: the block's).

    Returns:
        A `HorizonDerivatives` with `theta` set.
    """
    t_span = torch.stack([block.t0.detach(), block.t1.detach()]).to(dtype=x0.dtype, device=x0.device)
    result = second_order(block.func, x0, t_span, loss_fn, wrt_t1=True,
                          method=block.method if method is None else method,
                          rtol=block.rtol if rtol is None else rtol, atol=block.atol if atol is None else atol,
                          options=block.options if options is None else options)
    return HorizonDerivatives.from_second_order(result, _trainable(block))


def _positive_finite(name: str, value: float, *, allow_zero: bool = False) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"Invalid {name}: {value} (must be {'≥ 0' if allow_zero else '> 0'} and finite)")
    return v


class HorizonController:
    """Moves ``block.t1`` by a second-order feedback policy on J = L + ρ t1²/2 (see the module doc).

    Use beside any optimizer, after its step (so that δθ is the step just taken)::

        ctrl = HorizonController(model.block, lr=1.0, reg=1e-2, update_freq=50)
        for x, y in loader:
            opt.zero_grad(); loss = crit(model(x), y); loss.backward(); opt.step()
            ctrl.step()

    With ``curvature="exact"`` pass ``ctrl.step(horizon_derivatives(block, x, loss_fn))``,
    evaluated before the parameter step.

    Args:
        block: The `snopt.ODEBlock` whose ``t1`` buffer is optimised (t1 > 0 and t1 > t0).
        lr: Step scale (> 0): δt1 = −lr·(Q_t [+ Q_tθ δθ]) / Q_tt, or −lr·Q_t for ``"gradient"``.
        reg: ρ ≥ 0, the weight of the penalty ρ t1²/2.
        update_freq: Steps between updates of t1 (≥ 1).
        policy: ``"feedback"``, ``"open_loop"`` or ``"gradient"``.
        curvature: ``"gauss_newton"`` (from the training backward pass) or ``"exact"`` (from the
            `HorizonDerivatives` given to `step`).
        beta: Decay of the running averages, in [0, 1) (0: the latest step only).
        min_t1: Lower clamp of t1 (> 0 and > t0).
        max_t1: Upper clamp of t1 (> min_t1; may be inf).
        max_rel_step: Trust region: |δt1| ≤ max_rel_step·(t1 − t0) (> 0).
        damping: Floor of the curvature |Q_tt| (> 0).
        params: The parameters θ whose change δθ enters ``"feedback"`` (default: the trainable
            parameters of ``block.func``, as `horizon_derivatives` orders them). With
            ``"gauss_newton"`` you may pass all of the model's parameters.

    Attributes:
        t1_history: t1 at the start and after every update.
        num_updates: Updates made so far.

    Raises:
        TypeError: When `block` is not an `ODEBlock`.
        ValueError: On invalid hyper-parameters, or a block with t1 ≤ 0, t1 ≤ t0 or t1 < min_t1.
    """

    def __init__(self, block: ODEBlock, *, lr: float = 1.0, reg: float = 0.0, update_freq: int = 50,
                 policy: Policy = "feedback", curvature: Curvature = "gauss_newton", beta: float = 0.9,
                 min_t1: float = 0.01, max_t1: float = math.inf, max_rel_step: float = 0.5,
                 damping: float = 1e-8, params: Iterable[Tensor] | None = None) -> None:
        if not isinstance(block, ODEBlock):
            raise TypeError(f"`block` must be a snopt.ODEBlock; got {type(block).__name__}.")
        if policy not in POLICIES:
            raise ValueError(f"Invalid policy: {policy!r} (must be one of {POLICIES})")
        if curvature not in CURVATURES:
            raise ValueError(f"Invalid curvature: {curvature!r} (must be one of {CURVATURES})")
        if isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1:
            raise ValueError(f"Invalid update_freq: {update_freq} (must be an integer ≥ 1)")
        if not (math.isfinite(float(beta)) and 0.0 <= float(beta) < 1.0):
            raise ValueError(f"Invalid beta: {beta} (must be in [0, 1))")
        self.block = block
        self.lr = _positive_finite("lr", lr)
        self.reg = _positive_finite("reg", reg, allow_zero=True)
        self.update_freq = update_freq
        self.policy: Policy = policy
        self.curvature: Curvature = curvature
        self.beta = float(beta)
        self.min_t1 = _positive_finite("min_t1", min_t1)
        self.max_t1 = float(max_t1)
        if not (self.max_t1 > self.min_t1):
            raise ValueError(f"Invalid max_t1: {max_t1} (must be > min_t1 = {self.min_t1})")
        self.max_rel_step = _positive_finite("max_rel_step", max_rel_step)
        self.damping = _positive_finite("damping", damping)
        t0 = float(block.t0.detach())
        if not self.min_t1 > t0:
            raise ValueError(f"Invalid min_t1: {min_t1} (must be > the block's t0 = {t0})")
        t1 = self._t1()
        if t1 < self.min_t1:
            raise ValueError(f"The block's t1 = {t1} is below min_t1 = {self.min_t1}.")
        self.params: list[Tensor] = list(params) if params is not None else _trainable(block)
        self.t1_history: list[float] = [t1]
        self.num_updates = 0
        self._k = 0
        self._avg: dict[str, float] = dict.fromkeys(_STATS, 0.0)
        self._count = 0
        # Transient per-iteration records (gauss_newton mode).
        self._per_sample: Tensor | None = None  # (∂L/∂y_b)ᵀF(t1, y_b), from the latest backward
        self._theta_snap: Tensor | None = None
        self._grad_snap: dict[int, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        if curvature == "gauss_newton":
            self._handles.append(block.register_forward_hook(self._post_hook))
            if policy == "feedback":
                self._handles.append(block.register_forward_pre_hook(self._pre_hook))
                for i, p in enumerate(self.params):
                    if p.requires_grad:
                        self._handles.append(
                            p.register_post_accumulate_grad_hook(self._grad_hook(i)))  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled() and self.policy == "feedback":
            self._theta_snap = _flat([p.detach() for p in self.params]).clone()

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        y = output.detach()
        self._per_sample = None

        def keep(g: Tensor) -> None:
            # Runs inside backward, before any optimizer step: F is evaluated at the θ of the forward pass.
            with torch.no_grad():
                f1 = self.block.func(self.block.t1.detach().to(dtype=y.dtype, device=y.device), y)
                prod = g.detach() * f1
                self._per_sample = prod.reshape(y.shape[0], -1).sum(1) if y.ndim >= 2 else prod.sum().reshape(1)

        output.register_hook(keep)  # type: ignore[no-untyped-call]

    def _grad_hook(self, i: int) -> Any:
        def hook(p: Tensor) -> None:
            if p.grad is not None:
                self._grad_snap[i] = p.grad.detach().clone()
        return hook

    def remove(self) -> None:
        """Remove the hooks (the controller then records nothing; ``block.t1`` keeps its value)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ helpers
    def _t1(self) -> float:
        t1, t0 = float(self.block.t1.detach()), float(self.block.t0.detach())
        if not math.isfinite(t1) or t1 <= 0 or t1 <= t0:
            raise ValueError(f"The block's t1 must be finite, positive and greater than t0 = {t0}; got {t1}.")
        return t1

    def _set_t1(self, value: float) -> None:
        t1 = self.block.t1
        if t1.requires_grad:  # someone made it a graph node: replace it by a plain buffer value
            self.block.t1 = torch.tensor(value, dtype=t1.dtype, device=t1.device)
        else:
            with torch.no_grad():
                t1.fill_(value)

    def _clear(self) -> None:
        self._per_sample = self._theta_snap = None
        self._grad_snap = {}

    def _measure_gauss_newton(self) -> dict[str, float]:
        per = self._per_sample
        if per is None:
            raise RuntimeError("No ∂L/∂x(t1) was recorded: call step() after loss.backward() through the block "
                               "(its forward run with grad enabled).")
        s = per * per.numel()  # ∂ℓ_b/∂t1 for a batch-mean loss
        stats = {"q_t": float(per.sum()), "q_tt": float((s * s).mean()), "q_tdtheta": 0.0}
        if self.policy == "feedback":
            if self._theta_snap is None:
                raise RuntimeError("No parameter snapshot: the block's forward pass did not run with grad enabled.")
            dtheta = _flat([p.detach() for p in self.params]) - self._theta_snap
            grads = _flat([self._grad_snap[i] if i in self._grad_snap else torch.zeros_like(p)
                           for i, p in enumerate(self.params)])
            stats["q_tdtheta"] = stats["q_t"] * float(torch.dot(grads.to(dtheta), dtheta))
        return stats

    def _measure_exact(self, d: HorizonDerivatives) -> dict[str, float]:
        stats = {"q_t": float(d.grad_t1), "q_tt": float(d.hess_t1), "q_tdtheta": 0.0}
        if self.policy == "feedback":
            if d.theta is None:
                raise ValueError("policy='feedback' needs `derivatives.theta` (use `horizon_derivatives` or "
                                 "HorizonDerivatives.from_second_order(result, params)).")
            theta = _flat([p.detach() for p in self.params])
            if d.hess_t1_params.numel() != theta.numel() or d.theta.numel() != theta.numel():
                raise ValueError(f"`derivatives` has {d.hess_t1_params.numel()} parameters but the controller's "
                                 f"`params` have {theta.numel()}.")
            dtheta = theta - d.theta.to(theta)
            stats["q_tdtheta"] = float(torch.dot(d.hess_t1_params.to(theta), dtheta))
        return stats

    def statistics(self) -> dict[str, float]:
        """Current running averages (bias-corrected) of ∂L/∂t1, ∂²L/∂t1² and Q_tθ δθ (no penalty).

        Returns:
            ``{"q_t": ..., "q_tt": ..., "q_tdtheta": ..., "count": n}``; zeros when the window is empty.
        """
        if self._count == 0:
            return {**dict.fromkeys(_STATS, 0.0), "count": 0.0}
        corr = 1.0 - self.beta ** self._count
        return {**{k: v / corr for k, v in self._avg.items()}, "count": float(self._count)}

    def proposed_step(self) -> float:
        """The δt1 (before clamping to [min_t1, max_t1]) an update would make now.

        Returns:
            δt1 from the current averages, the penalty and the policy, limited by the trust region.

        Raises:
            RuntimeError: When no derivatives have been recorded since the last update.
        """
        if self._count == 0:
            raise RuntimeError("No derivatives recorded since the last update.")
        s = self.statistics()
        t1 = self._t1()
        q_t = s["q_t"] + self.reg * t1
        if self.policy == "gradient":
            delta = -self.lr * q_t
        else:
            curv = max(abs(s["q_tt"] + self.reg), self.damping)
            num = q_t + (s["q_tdtheta"] if self.policy == "feedback" else 0.0)
            delta = -self.lr * num / curv
        bound = self.max_rel_step * (t1 - float(self.block.t0.detach()))
        return min(max(delta, -bound), bound)

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def step(self, derivatives: HorizonDerivatives | None = None) -> float | None:
        """Record this iteration's t1 derivatives; every `update_freq` steps move t1.

        Call once per iteration, after the optimizer's step.

        Args:
            derivatives: Required with ``curvature="exact"`` (evaluated before the parameter
                step); must be None with ``"gauss_newton"``.

        Returns:
            The new t1 when it was updated at this step, else None.

        Raises:
            ValueError: On a t1 that is not positive and finite, `derivatives` that do not match
                the curvature mode or `params`.
            RuntimeError: With ``"gauss_newton"``, when no backward pass through the block ran.
        """
        t1 = self._t1()
        if self.curvature == "exact":
            if derivatives is None:
                raise ValueError("curvature='exact' needs `derivatives` (see `horizon_derivatives`).")
            stats = self._measure_exact(derivatives)
        else:
            if derivatives is not None:
                raise ValueError("`derivatives` are only used with curvature='exact'.")
            stats = self._measure_gauss_newton()
        self._clear()
        self._k += 1
        if not all(math.isfinite(v) for v in stats.values()):
            warnings.warn(f"Non-finite t1 derivatives {stats}: t1 update skipped (t1 = {t1:g} kept).",
                          RuntimeWarning, stacklevel=2)
            return None
        for k, v in stats.items():
            self._avg[k] = self.beta * self._avg[k] + (1.0 - self.beta) * v
        self._count += 1
        if self._k % self.update_freq != 0:
            return None
        new = min(max(t1 + self.proposed_step(), self.min_t1), self.max_t1)
        self._set_t1(new)
        self._avg = dict.fromkeys(_STATS, 0.0)
        self._count = 0
        self.num_updates += 1
        self.t1_history.append(float(self.block.t1.detach()))
        return self.t1_history[-1]

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, step counter, running averages, t1 and its history."""
        return {"lr": self.lr, "reg": self.reg, "update_freq": self.update_freq, "policy": self.policy,
                "curvature": self.curvature, "beta": self.beta, "min_t1": self.min_t1, "max_t1": self.max_t1,
                "max_rel_step": self.max_rel_step, "damping": self.damping, "step": self._k,
                "avg": dict(self._avg), "count": self._count, "t1": float(self.block.t1.detach()),
                "t1_history": list(self.t1_history), "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (and set ``block.t1``); the next steps are then identical.

        Args:
            state_dict: As returned by `state_dict`.

        Raises:
            ValueError: When the policy or curvature differ from this controller's, or t1 is invalid.
        """
        if state_dict["policy"] != self.policy or state_dict["curvature"] != self.curvature:
            raise ValueError(f"state_dict is for policy={state_dict['policy']!r}, curvature="
                             f"{state_dict['curvature']!r}; this controller has {self.policy!r}, {self.curvature!r}.")
        t1 = float(state_dict["t1"])
        if not (math.isfinite(t1) and t1 > 0 and t1 > float(self.block.t0.detach())):
            raise ValueError(f"state_dict has an invalid t1 = {t1}.")
        self.lr = _positive_finite("lr", state_dict["lr"])
        self.reg = _positive_finite("reg", state_dict["reg"], allow_zero=True)
        self.update_freq = int(state_dict["update_freq"])
        self.beta = float(state_dict["beta"])
        self.min_t1 = float(state_dict["min_t1"])
        self.max_t1 = float(state_dict["max_t1"])
        self.max_rel_step = float(state_dict["max_rel_step"])
        self.damping = float(state_dict["damping"])
        self._k = int(state_dict["step"])
        self._avg = {k: float(v) for k, v in cast(dict[str, float], state_dict["avg"]).items()}
        self._count = int(state_dict["count"])
        self.t1_history = [float(v) for v in state_dict["t1_history"]]
        self.num_updates = int(state_dict["num_updates"])
        self._set_t1(t1)
        self._clear()

    def __repr__(self) -> str:
        return (f"HorizonController(t1={float(self.block.t1.detach()):g}, policy={self.policy!r}, curvature="
                f"{self.curvature!r}, lr={self.lr:g}, reg={self.reg:g}, update_freq={self.update_freq})")


__all__ = ["CURVATURES", "POLICIES", "Curvature", "HorizonController", "HorizonDerivatives", "Policy",
           "horizon_derivatives"]
