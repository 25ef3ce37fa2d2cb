"""Small random Neural ODE problems, reproducible from a printed spec.

A spec is a frozen dataclass of plain numbers and a seed (so hypothesis prints and shrinks it,
and a failure is reproducible from the printed spec); ``build`` turns it into tensors with a
seeded `torch.Generator`, never the global RNG. `snopt.testing.strategies` draws them.

* `MLPField`, `ConvField`, `AffineField` (and `LinearField`): vector fields ``forward(t, x)``.
* `FieldSpec`, `LinearSpec`: a random MLP or linear field.
* `OdeintProblem`: a field, an initial batch, several output times and a loss over all of them
  (for `snopt.odeint`'s gradients).
* `SecondOrderProblem`: a field, an initial state, a span (t0, t1) and a terminal loss Φ(x(t1))
  (for `snopt.second_order`, `hvp`, `ggn_vp`).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from snopt import losses
from snopt._types import LossFn
from snopt.testing._references import LinearField

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"silu": nn.SiLU, "softplus": nn.Softplus, "tanh": nn.Tanh}
"""The activations the random fields use, by name."""
FIELD_KINDS = ("mlp", "conv", "affine", "linear")
"""The vector fields a `SecondOrderProblem` can build."""


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}; got {name!r}.")
    return ACTIVATIONS[name]()


class MLPField(nn.Module):
    """F(t, x) = W2 σ(W1 [x; t] + b1) + b2 on states (..., dim); t is appended only if `time_dependent`.

    Args:
        dim: State dimension.
        width: Hidden width.
        activation: ``"silu"``, ``"softplus"`` or ``"tanh"``.
        time_dependent: Append t to the input.
        dtype: Parameter dtype.
    """

    def __init__(self, dim: int, width: int, activation: str, time_dependent: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.time_dependent = time_dependent
        self.lin1 = nn.Linear(dim + int(time_dependent), width, dtype=dtype)
        self.act = _activation(activation)
        self.lin2 = nn.Linear(width, dim, dtype=dtype)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Evaluate the field at time `t` (0-d) and state `x` (..., dim)."""
        if self.time_dependent:
            x = torch.cat([x, t.to(x.dtype).expand(*x.shape[:-1], 1)], dim=-1)
        out: Tensor = self.lin2(self.act(self.lin1(x)))
        return out


class ConvField(nn.Module):
    """F(t, x) = conv2(σ(conv1(x) [+ t·w_t])) on images x (B, C, H, W); 3×3 kernels, padding 1.

    Args:
        channels: C, the state's channels.
        hidden: Channels of the hidden layer.
        activation: ``"silu"``, ``"softplus"`` or ``"tanh"``.
        time_dependent: Add t times a learned per-channel vector to the hidden pre-activation.
        seed: Seed of the weights (drawn at scale 1/sqrt(fan_in)).
        dtype: Parameter dtype.
    """

    def __init__(self, channels: int, hidden: int, activation: str, time_dependent: bool, seed: int,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, dtype=dtype)
        self.act = _activation(activation)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, dtype=dtype)
        self.time_weight = nn.Parameter(torch.zeros(hidden, dtype=dtype)) if time_dependent else None
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(max(fan_in, 1)))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Evaluate the field at time `t` (0-d) and images `x` (B, C, H, W)."""
        h = self.conv1(x)
        if self.time_weight is not None:
            h = h + t.to(x.dtype) * self.time_weight.reshape(1, -1, 1, 1)
        out: Tensor = self.conv2(self.act(h))
        return out


class AffineField(nn.Module):
    """F(t, x) = x A0ᵀ + b + t c with A0 a fixed buffer; the parameters θ = (b, c) enter linearly.

    θ never multiplies x, so x(t1) is affine in (x0, θ) jointly and the Gauss-Newton matrix of
    any loss is its exact Hessian.

    Args:
        a0: (d, d) fixed matrix.
        b: (d,) initial value of the parameter b.
        c: (d,) initial value of the parameter c.
    """

    a0: Tensor  # a buffer (registered in __init__)

    def __init__(self, a0: Tensor, b: Tensor, c: Tensor) -> None:
        super().__init__()
        self.register_buffer("a0", a0.detach().clone())
        self.b = nn.Parameter(b.detach().clone())
        self.c = nn.Parameter(c.detach().clone())

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Evaluate the field at time `t` (0-d) and state `x` (..., d)."""
        out: Tensor = x @ self.a0.T + self.b + t.to(x.dtype) * self.c
        return out


@dataclass(frozen=True)
class FieldSpec:
    """A random `MLPField`; `scale` multiplies the 1/sqrt(fan_in) weight scale.

    Attributes:
        dim: State dimension.
        width: Hidden width.
        activation: A key of `ACTIVATIONS`.
        time_dependent: Whether t is an input.
        dtype: Parameter dtype.
        seed: Seed of the weights.
        scale: Weight scale factor.
    """

    dim: int
    width: int
    activation: str
    time_dependent: bool
    dtype: torch.dtype
    seed: int
    scale: float = 1.0

    def build(self) -> MLPField:
        """The field with weights drawn from a generator seeded by `seed`."""
        g = torch.Generator().manual_seed(self.seed)
        f = MLPField(self.dim, self.width, self.activation, self.time_dependent, self.dtype)
        with torch.no_grad():
            for lin in (f.lin1, f.lin2):
                fan_in = lin.weight.shape[1]
                w = torch.randn(lin.weight.shape, generator=g, dtype=torch.float64) * self.scale / math.sqrt(fan_in)
                lin.weight.copy_(w)
                lin.bias.copy_(0.5 * torch.randn(lin.bias.shape, generator=g, dtype=torch.float64))
        return f


@dataclass(frozen=True)
class LinearSpec:
    """dx/dt = A x + b with A = scale · randn / sqrt(dim), b ~ randn.

    Attributes:
        dim: State dimension.
        dtype: Parameter dtype.
        seed: Seed of A and b.
        scale: Scale of A (‖A‖ ≈ scale).
    """

    dim: int
    dtype: torch.dtype
    seed: int
    scale: float = 1.0

    def matrices(self) -> tuple[Tensor, Tensor]:
        """(A, b) drawn from a generator seeded by `seed`."""
        g = torch.Generator().manual_seed(self.seed)
        A = torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64) * self.scale / math.sqrt(self.dim)  # noqa: N806
        b = torch.randn(self.dim, generator=g, dtype=torch.float64)
        return A.to(self.dtype), b.to(self.dtype)

    def build(self) -> LinearField:
        """The field as a module whose parameters are A and b."""
        return LinearField(*self.matrices())


@dataclass(frozen=True)
class OdeintProblem:
    """A vector field, an initial batch y0 (batch, dim), output times and a loss over all outputs.

    Attributes:
        field: The field's spec.
        batch: Number of initial states.
        t: Output times (strictly monotone).
        seed: Seed of y0 and of the loss weights.
        quad: Weight of the quadratic part of the loss.
    """

    field: FieldSpec | LinearSpec
    batch: int
    t: tuple[float, ...]
    seed: int
    quad: float = 0.5

    @property
    def dtype(self) -> torch.dtype:
        """The problem's floating dtype."""
        return self.field.dtype

    def y0(self) -> Tensor:
        """The initial state (batch, dim)."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.batch, self.field.dim, generator=g, dtype=torch.float64).to(self.dtype)

    def times(self) -> Tensor:
        """The output times as a tensor of the problem's dtype."""
        return torch.tensor(self.t, dtype=torch.float64).to(self.dtype)

    def loss_fn(self) -> LossFn:
        """L(ys) = Σ w·ys + ½ quad Σ ys², ys shaped (len(t), batch, dim), w drawn from the seed."""
        g = torch.Generator().manual_seed(self.seed + 1)
        w = torch.randn(len(self.t), self.batch, self.field.dim, generator=g, dtype=torch.float64).to(self.dtype)
        quad = self.quad

        def loss(ys: Tensor) -> Tensor:
            return (w * ys).sum() + 0.5 * quad * ys.pow(2).sum()

        return loss


class _FlatImageLoss:
    """`snopt.losses.LinearCrossEntropy` on flattened images x (B, C, H, W) → (B, C·H·W), roots included."""

    def __init__(self, ce: losses.LinearCrossEntropy) -> None:
        self.ce = ce

    def __call__(self, x: Tensor) -> Tensor:
        return self.ce(x.reshape(x.shape[0], -1))

    def hessian_roots(self, x: Tensor) -> Tensor:
        """The roots of the flat loss, reshaped over x."""
        r = self.ce.hessian_roots(x.reshape(x.shape[0], -1))
        return r.reshape(r.shape[0], *x.shape)


@dataclass(frozen=True)
class SecondOrderProblem:
    """A terminal-loss Neural ODE problem L = Φ(x(t1)), reproducible from its printed fields.

    Attributes:
        kind: ``"mlp"`` (`MLPField`, state (batch, dim)), ``"conv"`` (`ConvField`, state
            (batch, dim, 4, 4)), ``"affine"`` (`AffineField`) or ``"linear"`` (`LinearField`,
            θ = (A, b)).
        dim: State dimension (channels for ``"conv"``).
        width: Hidden width (channels for ``"conv"``; unused by ``"affine"`` and ``"linear"``).
        activation: A key of `ACTIVATIONS` (unused by ``"affine"`` and ``"linear"``).
        time_dependent: Whether the field depends on t (``"mlp"``, ``"conv"``).
        batch: Number of initial states.
        t0: Start time.
        t1: End time.
        loss: ``"mse"`` (`snopt.losses.MSELoss` to a random target) or ``"ce"``
            (`snopt.losses.LinearCrossEntropy` of a random fixed readout).
        seed: Seed of everything drawn.
        scale: Weight scale factor.
        classes: Classes of the ``"ce"`` readout.
    """

    kind: str
    dim: int
    width: int
    activation: str
    time_dependent: bool
    batch: int
    t0: float
    t1: float
    loss: str
    seed: int
    scale: float = 1.0
    classes: int = 3

    def build(self, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Tensor, Tensor, LossFn]:
        """Tensors of the problem: ``(func, x0, t_span, loss_fn)``, the arguments of `snopt.second_order`.

        Args:
            dtype: Floating dtype of every tensor.

        Returns:
            The field, the initial state, the span (t0, t1) and Φ.

        Raises:
            ValueError: For an unknown `kind` or `loss`.
        """
        g = torch.Generator().manual_seed(self.seed)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

        func: nn.Module
        if self.kind == "mlp":
            func = FieldSpec(self.dim, self.width, self.activation, self.time_dependent, dtype, self.seed,
                             self.scale).build()
            x0 = randn(self.batch, self.dim)
        elif self.kind == "conv":
            func = ConvField(self.dim, self.width, self.activation, self.time_dependent, self.seed, dtype)
            x0 = randn(self.batch, self.dim, 4, 4)
        elif self.kind == "affine":
            func = AffineField(randn(self.dim, self.dim) * self.scale / math.sqrt(self.dim), randn(self.dim),
                               randn(self.dim))
            x0 = randn(self.batch, self.dim)
        elif self.kind == "linear":
            func = LinearField(randn(self.dim, self.dim) * self.scale / math.sqrt(self.dim), randn(self.dim))
            x0 = randn(self.batch, self.dim)
        else:
            raise ValueError(f"`kind` must be one of {FIELD_KINDS}; got {self.kind!r}.")
        loss_fn: LossFn
        if self.loss == "mse":
            loss_fn = losses.MSELoss(randn(*x0.shape))
        elif self.loss == "ce":
            d = x0[0].numel()
            ce = losses.LinearCrossEntropy(randn(self.classes, d), randn(self.classes),
                                           torch.randint(0, self.classes, (self.batch,), generator=g))
            loss_fn = _FlatImageLoss(ce) if self.kind == "conv" else ce
        else:
            raise ValueError(f"`loss` must be 'mse' or 'ce'; got {self.loss!r}.")
        t_span = torch.tensor([self.t0, self.t1], dtype=dtype)
        return func, x0, t_span, loss_fn

    def steps(self, step: float) -> int:
        """Number of fixed steps of size `step` in the span.

        Args:
            step: The step size.

        Returns:
            |t1 − t0| / step.

        Raises:
            ValueError: If the span is not a multiple of `step`.
        """
        k = round(abs(self.t1 - self.t0) / step)
        if k < 1 or abs(k * step - abs(self.t1 - self.t0)) >= 1e-12:
            raise ValueError(f"The span {self.t0} → {self.t1} is not a multiple of the step {step}.")
        return k
