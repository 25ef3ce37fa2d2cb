"""FFJORD-style continuous normalizing flows (Grathwohl et al., ICLR 2019).

A CNF moves a data point x along ``dz/dt = f(t, z)`` from ``z(0) = x`` to ``z(t1)``,
a point of the base density (a standard normal). Along the way the log-density obeys
the instantaneous change of variables ``d log p(z(t))/dt = -tr(∂f/∂z)``, so the state
carries an accumulator ``Δlogp`` with ``dΔlogp/dt = -div f`` and ``Δlogp(0) = 0``:

    log p(x) = log N(z(t1); 0, I) - Δlogp(t1) = log N(z(t1)) + ∫₀^t1 div f dt.

`DivergenceField` turns any velocity ``velocity(t, z) -> dz/dt`` into that augmented
field on the tuple state ``(z, Δlogp)``; the divergence is either exact (one
vector-Jacobian product per dimension: small dimensions only) or Hutchinson's estimate
``εᵀ(∂f/∂z)ε`` with Rademacher noise ε held fixed for a whole solve. Both are built with
``torch.autograd.grad(create_graph=True)`` whenever gradients are recorded, so the log
density is differentiable in the parameters (for backprop through the solver and for
the adjoint alike). `CNFField` is the usual concat-squash MLP velocity so wrapped.

The ODE solver is passed in: ``torchdiffeq.odeint`` (backprop through the solver),
``torchdiffeq.odeint_adjoint`` or `snopt.odeint` (O(1)-memory adjoint); all three take
the tuple state.
"""

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from snopt.adjoint._odeint import odeint
from snopt.nn._ode_block import ODEBlock

Divergence = Literal["exact", "hutchinson"]
Activation = Literal["softplus", "tanh", "elu", "swish", "relu"]

OdeintFn = Callable[..., Any]
"""``odeint(func, y0, t, **kw)`` with tuple states: `snopt.odeint`, ``torchdiffeq.odeint(_adjoint)``."""

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "swish": nn.SiLU,
    "relu": nn.ReLU,
}


class ConcatSquashLinear(nn.Module):
    """A time-conditioned linear layer: ``(W x + b) * sigmoid(w_g t + b_g) + w_b t``.

    Args:
        d_in: Input features.
        d_out: Output features.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        if d_in < 1 or d_out < 1:
            raise ValueError(f"`d_in` and `d_out` must be positive; got {d_in} and {d_out}.")
        self.linear = nn.Linear(d_in, d_out)
        self.hyper_gate = nn.Linear(1, d_out)
        self.hyper_bias = nn.Linear(1, d_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            t: Scalar time (a 0-d or one-element tensor).
            x: Input of shape ``(..., d_in)``.

        Returns:
            Output of shape ``(..., d_out)``.
        """
        tt = t.reshape(1, 1).to(x.dtype)
        gate = torch.sigmoid(self.hyper_gate(tt)).reshape(-1)
        shift = self.hyper_bias(tt).reshape(-1)
        out: Tensor = self.linear(x) * gate + shift
        return out


class ConcatSquashNet(nn.Module):
    """A velocity ``f(t, x)``: concat-squash layers with an activation between them.

    Args:
        dim: Dimension of x (input and output).
        hidden: Width of the hidden layers.
        num_layers: Number of hidden layers (so ``num_layers + 1`` concat-squash layers).
        activation: ``"softplus"`` (default), ``"tanh"``, ``"elu"``, ``"swish"`` or ``"relu"``.
            Prefer a smooth one: the divergence differentiates the field.
    """

    def __init__(self, dim: int, hidden: int = 64, num_layers: int = 2, activation: Activation = "softplus") -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"`num_layers` must be at least 1; got {num_layers}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}.")
        widths = [dim] + [hidden] * num_layers + [dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = _ACTIVATIONS[activation]()

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Evaluate the velocity.

        Args:
            t: Scalar time.
            x: Points of shape ``(batch, dim)``.

        Returns:
            dx/dt of shape ``(batch, dim)``.
        """
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h


class DivergenceField(nn.Module):
    """The CNF field on ``(z, Δlogp)``: ``(f(t, z), -div f(t, z))`` for any velocity f.

    Args:
        velocity: A module called as ``velocity(t, z) -> dz/dt`` on ``z`` of shape ``(batch, dim)``.
        divergence: ``"exact"`` (``dim`` vector-Jacobian products per evaluation) or
            ``"hutchinson"`` (one, with the noise set by `sample_noise` before each solve).
    """

    noise: Tensor | None

    def __init__(self, velocity: nn.Module, divergence: Divergence = "exact") -> None:
        super().__init__()
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"`divergence` must be 'exact' or 'hutchinson'; got {divergence!r}.")
        self.velocity = velocity
        self.divergence: Divergence = divergence
        self.noise = None

    def sample_noise(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw the Rademacher noise ε (entries ±1) shaped like `x`, used until the next call.

        Call it once before each solve that uses the Hutchinson estimator
        (`cnf_log_density` does): the estimator is unbiased only if ε stays fixed along
        the trajectory, and the adjoint's backward solve must see the same ε.

        Args:
            x: A tensor shaped like the state z (batch, dim); its dtype and device are used.
            generator: Optional random generator, for reproducible noise.

        Returns:
            The noise, also stored as ``self.noise``.
        """
        bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
        self.noise = (2 * bits - 1).to(x.dtype)
        return self.noise

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Evaluate the augmented field.

        Args:
            t: Scalar time.
            state: ``(z, Δlogp)`` with z of shape ``(batch, dim)`` and Δlogp of shape ``(batch,)``.

        Returns:
            ``(dz/dt, dΔlogp/dt)`` with ``dΔlogp/dt = -div f`` of shape ``(batch,)``.

        Raises:
            RuntimeError: For the Hutchinson estimator when no noise of z's shape was sampled.
        """
        z = state[0]
        if z.dim() != 2:
            raise ValueError(f"The CNF state z must have shape (batch, dim); got {tuple(z.shape)}.")
        record = torch.is_grad_enabled()
        with torch.enable_grad():
            if not record or not z.requires_grad:  # a forward solve may hand in a no-grad view of a leaf,
                z = z.detach().requires_grad_(True)  # whose derivative autograd would report as zero
            dz: Tensor = self.velocity(t, z)
            if self.divergence == "exact":
                div = _exact_divergence(dz, z, create_graph=record)
            else:
                div = self._hutchinson_divergence(dz, z, create_graph=record)
        if not record:
            dz, div = dz.detach(), div.detach()
        return dz, -div

    def _hutchinson_divergence(self, dz: Tensor, z: Tensor, *, create_graph: bool) -> Tensor:
        noise = self.noise
        if noise is None or noise.shape != z.shape:
            got = "none" if noise is None else tuple(noise.shape)
            raise RuntimeError(f"Hutchinson divergence needs noise shaped like z {tuple(z.shape)} (got {got}): "
                               "call `sample_noise(z)` before the solve.")
        if not dz.requires_grad:  # a velocity that ignores z and has no trainable parameters
            return torch.zeros(z.shape[0], dtype=dz.dtype, device=dz.device)
        (vjp,) = torch.autograd.grad(dz, z, noise, create_graph=create_graph, allow_unused=True,
                                     materialize_grads=True)
        return (vjp * noise).sum(dim=1)


def _exact_divergence(dz: Tensor, z: Tensor, *, create_graph: bool) -> Tensor:
    """``Σ_i ∂f_i/∂z_i`` per batch row, one vector-Jacobian product per dimension."""
    div = torch.zeros(z.shape[0], dtype=dz.dtype, device=dz.device)
    if not dz.requires_grad:  # a velocity that ignores z and has no trainable parameters
        return div
    for i in range(z.shape[1]):
        (g,) = torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True,
                                   allow_unused=True, materialize_grads=True)
        div = div + g[:, i]
    return div


class CNFField(DivergenceField):
    """An FFJORD field: a concat-squash MLP velocity with its divergence.

    Args:
        dim: Data dimension.
        hidden: Width of the hidden layers.
        num_layers: Number of hidden layers.
        activation: Activation between layers (smooth ones suit the divergence).
        divergence: ``"exact"`` for small `dim`, else ``"hutchinson"``.
    """

    def __init__(self, dim: int, hidden: int = 64, num_layers: int = 2, activation: Activation = "softplus",
                 divergence: Divergence = "exact") -> None:
        super().__init__(ConcatSquashNet(dim, hidden, num_layers, activation), divergence)
        self.dim = dim


def standard_normal_logprob(z: Tensor) -> Tensor:
    """Log-density of the standard normal, summed over all but the batch dimension.

    Args:
        z: Points of shape ``(batch, ...)``.

    Returns:
        ``log N(z; 0, I)`` of shape ``(batch,)``.
    """
    logp = -0.5 * (math.log(2 * math.pi) + z.pow(2))
    return logp.reshape(z.shape[0], -1).sum(dim=1)


def cnf_forward(field: DivergenceField, x: Tensor, t1: float, odeint_fn: OdeintFn,
                **solver_kw: Any) -> tuple[Tensor, Tensor]:
    """Integrate data to noise: ``(x, 0)`` from time 0 to `t1`.

    For the Hutchinson estimator a fresh noise is drawn (``field.sample_noise(x)``).

    Args:
        field: The CNF field.
        x: Data of shape ``(batch, dim)``.
        t1: End time (positive).
        odeint_fn: The solver, e.g. `snopt.odeint` or ``torchdiffeq.odeint``.
        **solver_kw: Passed to `odeint_fn` (``method``, ``rtol``, ``atol``, ``options``...).

    Returns:
        ``(z, Δlogp)``: z = z(t1) of shape ``(batch, dim)`` and Δlogp of shape ``(batch,)``.
    """
    if not t1 > 0:
        raise ValueError(f"`t1` must be positive; got {t1}.")
    if field.divergence == "hutchinson":
        field.sample_noise(x)
    t = torch.tensor([0.0, t1], dtype=x.dtype, device=x.device)
    logp0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    zs, dlogps = odeint_fn(field, (x, logp0), t, **solver_kw)
    return zs[-1], dlogps[-1]


def cnf_log_density(field: DivergenceField, x: Tensor, t1: float, odeint_fn: OdeintFn, **solver_kw: Any) -> Tensor:
    """``log p(x) = log N(z(t1)) - Δlogp(t1)`` (nats), integrating data to noise.

    Args:
        field: The CNF field.
        x: Data of shape ``(batch, dim)``.
        t1: End time (positive).
        odeint_fn: The solver, e.g. `snopt.odeint` or ``torchdiffeq.odeint``.
        **solver_kw: Passed to `odeint_fn`.

    Returns:
        log p(x) of shape ``(batch,)``; its negative mean is the NLL in nats.
    """
    z, delta_logp = cnf_forward(field, x, t1, odeint_fn, **solver_kw)
    return standard_normal_logprob(z) - delta_logp


def cnf_sample(field: DivergenceField, z: Tensor, t1: float, odeint_fn: OdeintFn, **solver_kw: Any) -> Tensor:
    """Integrate noise to data: z at time `t1` back to time 0.

    Args:
        field: The CNF field.
        z: Base samples of shape ``(batch, dim)`` (e.g. ``torch.randn``).
        t1: Start time of the backward solve (positive).
        odeint_fn: The solver.
        **solver_kw: Passed to `odeint_fn`.

    Returns:
        Samples x of shape ``(batch, dim)``.
    """
    if not t1 > 0:
        raise ValueError(f"`t1` must be positive; got {t1}.")
    if field.divergence == "hutchinson":
        field.sample_noise(z)
    t = torch.tensor([t1, 0.0], dtype=z.dtype, device=z.device)
    logp = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    xs, _ = odeint_fn(field, (z, logp), t, **solver_kw)
    x: Tensor = xs[-1]
    return x


class CNF(nn.Module):
    """A continuous normalizing flow ``x ↦ log p(x)`` (nats) that `snopt.SNOpt` can train.

    Its vector field sits in an `ODEBlock` (``cnf.block``), so `SNOpt` finds the field's layers,
    gathers their Kronecker factors along the adjoint solve and guards the solves (step recovery);
    the log-density is solved by `snopt.odeint` with the block's solver settings. Training is
    maximum likelihood: ``loss = -cnf(x).mean()``.

    Args:
        dim: Data dimension.
        hidden: Width of the concat-squash layers of the default field.
        num_layers: Hidden layers of the default field.
        field: The augmented field (default: ``CNFField(dim, hidden, num_layers, divergence=...)``).
        t1: Integration time.
        divergence: ``"exact"`` (small `dim`) or ``"hutchinson"`` for the default field.
        method: torchdiffeq method.
        rtol: Relative tolerance (forward and backward).
        atol: Absolute tolerance (forward and backward).
        adjoint_norm: Backward error control, ``"mixed"`` or ``"seminorm"`` (see `snopt.odeint`).

    Example:
        >>> cnf = CNF(2, hidden=32)  # doctest: +SKIP
        >>> opt = snopt.SNOpt(cnf)  # doctest: +SKIP
        >>> loss = -cnf(x).mean(); opt.zero_grad(); loss.backward(); opt.step()  # doctest: +SKIP
    """

    def __init__(self, dim: int, hidden: int = 64, num_layers: int = 2, *, field: DivergenceField | None = None,
                 t1: float = 1.0, divergence: Divergence = "exact", method: str = "dopri5", rtol: float = 1e-3,
                 atol: float = 1e-3, adjoint_norm: Literal["mixed", "seminorm"] = "mixed") -> None:
        super().__init__()
        f = field if field is not None else CNFField(dim, hidden=hidden, num_layers=num_layers,
                                                     divergence=divergence)
        if not isinstance(f, DivergenceField):
            raise TypeError(f"`field` must be a DivergenceField (e.g. CNFField); got {type(f).__name__}.")
        self.dim = dim
        self.block = ODEBlock(f, t1=t1, method=method, rtol=rtol, atol=atol, adjoint_norm=adjoint_norm)

    @property
    def field(self) -> DivergenceField:
        """The augmented CNF field."""
        f = self.block.func
        assert isinstance(f, DivergenceField)
        return f

    def _solver_kw(self, rtol: float | None, atol: float | None) -> dict[str, Any]:
        b = self.block
        return {"method": b.method, "rtol": rtol if rtol is not None else b.rtol,
                "atol": atol if atol is not None else b.atol, "options": b.options,
                "adjoint_options": b.adjoint_options, "adjoint_norm": b.adjoint_norm, "observer": b.observer,
                "stats": b.stats, "guard": b.guard}

    def forward(self, x: Tensor, *, rtol: float | None = None, atol: float | None = None) -> Tensor:
        """The log-density log p(x) (nats), shape ``(batch,)``; ``block.stats`` counts its NFE.

        Args:
            x: Points ``(batch, dim)``.
            rtol: Override of the relative tolerance (e.g. tighter for evaluation).
            atol: Override of the absolute tolerance.

        Returns:
            log p(x).
        """
        self.block.stats.reset()
        return cnf_log_density(self.field, x, float(self.block.t1), odeint, **self._solver_kw(rtol, atol))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, rtol: float | None = None,
               atol: float | None = None) -> Tensor:
        """Draw `n` samples: standard-normal noise integrated from ``t1`` back to 0.

        Args:
            n: Number of samples.
            generator: Random generator of the noise.
            rtol: Override of the relative tolerance.
            atol: Override of the absolute tolerance.

        Returns:
            Samples ``(n, dim)``, in the field's dtype and device.
        """
        p = next(self.field.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=p.dtype, device=p.device)
        kw = {k: v for k, v in self._solver_kw(rtol, atol).items() if k not in ("observer", "guard")}
        return cnf_sample(self.field, z, float(self.block.t1), odeint, **kw)


__all__ = [
    "CNF",
    "Activation",
    "CNFField",
    "ConcatSquashLinear",
    "ConcatSquashNet",
    "Divergence",
    "DivergenceField",
    "OdeintFn",
    "cnf_forward",
    "cnf_log_density",
    "cnf_sample",
    "standard_normal_logprob",
]
