"""The stiffness regularisers (`ODEBlock(kinetic=, jacobian=)`) against exact references.

* A linear field f = A x has x(t) = expm(A t) x0, so ∫‖f‖² dt is a smooth integral of matrix
  exponentials (Gauss–Legendre quadrature to round-off) and ∫‖εᵀA‖² dt = T‖εᵀA‖²; autograd through
  `matrix_exp` gives the exact gradients in A and x0.
* A nonlinear field is checked against backprop through plain `torchdiffeq.odeint` of an
  independently written augmented system whose Jacobian term uses the explicit Jacobian from
  `torch.func.jacrev` (not a vector-Jacobian product).
"""

from typing import Any

import numpy as np
import pytest
import torch
import torchdiffeq
from torch import Tensor, nn

import snopt
from snopt.nn import RegularizedField

F64 = torch.float64
TIGHT: dict[str, Any] = {"rtol": 1e-11, "atol": 1e-11}


class Linear(nn.Module):
    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return x @ self.a.T


class MLP(nn.Module):
    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(d + 1, width), nn.Linear(width, d)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.expand(x.shape[0], 1)
        out: Tensor = self.l2(torch.tanh(self.l1(torch.cat([x, tt], 1))))
        return out


def _exact_linear(a: Tensor, x0: Tensor, noise: Tensor, t1: float, kin: float, jac: float) -> Tensor:
    nodes, weights = np.polynomial.legendre.leggauss(40)
    total = torch.zeros((), dtype=F64)
    for s, w in zip(nodes, weights, strict=True):
        t = 0.5 * t1 * (float(s) + 1.0)
        xt = x0 @ torch.linalg.matrix_exp(a * t).T
        total = total + 0.5 * t1 * float(w) * (xt @ a.T).pow(2).sum(1).mean()
    return kin * total + jac * t1 * (noise @ a).pow(2).sum(1).mean()


@pytest.mark.parametrize(("kin", "jac"), [(0.3, 0.0), (0.0, 0.2), (0.3, 0.2)])
def test_linear_field_regulariser_and_its_gradients_are_exact(kin: float, jac: float) -> None:
    g = torch.Generator().manual_seed(3)
    a0 = 0.5 * torch.randn(3, 3, generator=g, dtype=F64)
    x0 = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    field = Linear(a0)
    block = snopt.ODEBlock(field, t1=0.9, **TIGHT, kinetic=kin, jacobian=jac)
    torch.manual_seed(11)
    y = block(x0)
    reg = snopt.nn.regularization(block)
    gy = torch.randn(y.shape, generator=g, dtype=F64)
    ours = torch.autograd.grad((y * gy).sum() + reg, [field.a, x0])

    torch.manual_seed(11)  # the block's noise, drawn again from the same stream
    noise = torch.randn(x0.shape, dtype=F64)
    a = a0.clone().requires_grad_(True)
    y_ref = x0 @ torch.linalg.matrix_exp(a * 0.9).T
    reg_ref = _exact_linear(a, x0, noise, 0.9, kin, jac)
    ref = torch.autograd.grad((y_ref * gy).sum() + reg_ref, [a, x0])
    torch.testing.assert_close(reg, reg_ref, rtol=1e-8, atol=1e-10)
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-7, atol=1e-9)


class ReferenceAugmented(nn.Module):
    """(f, λ_K‖f‖² + λ_J‖εᵀJ‖²) with J from torch.func.jacrev, per sample."""

    def __init__(self, func: nn.Module, noise: Tensor, kin: float, jac: float) -> None:
        super().__init__()
        self.func, self.noise, self.kin, self.jac = func, noise, kin, jac

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x = state[0]
        f = self.func(t, x)

        def row(xi: Tensor) -> Tensor:
            out: Tensor = self.func(t, xi[None])[0]
            return out

        jacs = torch.func.vmap(torch.func.jacrev(row))(x)  # (batch, d_out, d_in)
        ej = torch.einsum("bo,boi->bi", self.noise, jacs)
        return f, self.kin * f.pow(2).sum(1) + self.jac * ej.pow(2).sum(1)


@pytest.mark.parametrize(("kin", "jac"), [(0.1, 0.0), (0.0, 0.05), (0.1, 0.05)])
def test_nonlinear_field_matches_backprop_through_torchdiffeq(kin: float, jac: float) -> None:
    torch.manual_seed(0)
    func = MLP(3, 12).to(F64)
    x0 = torch.randn(5, 3, dtype=F64, requires_grad=True)
    block = snopt.ODEBlock(func, t1=0.8, **TIGHT, kinetic=kin, jacobian=jac)
    torch.manual_seed(5)
    y = block(x0)
    reg = snopt.nn.regularization(block)
    params = [x0, *func.parameters()]
    ours = torch.autograd.grad(y.pow(2).sum() + reg, params)

    torch.manual_seed(5)
    noise = torch.randn(x0.shape, dtype=F64)
    t = torch.tensor([0.0, 0.8], dtype=F64)
    xs, rs = torchdiffeq.odeint(ReferenceAugmented(func, noise, kin, jac), (x0, x0.new_zeros(5)), t,
                                method="dopri5", **TIGHT)
    ref = torch.autograd.grad(xs[-1].pow(2).sum() + rs[-1].mean(), params)
    torch.testing.assert_close(reg, rs[-1].mean(), rtol=1e-8, atol=1e-10)
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-8)


def test_hutchinson_estimate_is_unbiased_for_the_frobenius_norm() -> None:
    # E over ε of ‖εᵀJ‖² is ‖J‖_F²: many noise draws of one evaluation of the field at one point.
    torch.manual_seed(1)
    func = MLP(3, 8).to(F64)
    x = torch.randn(1, 3, dtype=F64).repeat(4000, 1)
    field = RegularizedField(func, kinetic=0.0, jacobian=1.0)
    field.sample_noise(x, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(0.3, dtype=F64)
    with torch.no_grad():
        _, r = field(t, (x, x.new_zeros(len(x))))
    jac = torch.func.jacrev(lambda xi: func(t, xi[None])[0])(x[0])
    exact = float(jac.detach().pow(2).sum())
    assert abs(float(r.mean()) - exact) < 5 * float(r.std()) / len(r) ** 0.5


def test_off_by_default_and_weights_validated() -> None:
    torch.manual_seed(0)
    func = MLP(2, 6).to(F64)
    x = torch.randn(3, 2, dtype=F64)
    plain = snopt.ODEBlock(func, **TIGHT)
    zero = snopt.ODEBlock(func, **TIGHT, kinetic=0.0, jacobian=0.0)
    torch.testing.assert_close(plain(x), zero(x), rtol=0, atol=0)
    assert zero.regularization is None and not zero.regularized
    with pytest.raises(ValueError, match="nothing to add"):
        snopt.nn.regularization(nn.Sequential(zero))
    bads: list[dict[str, Any]] = [{"kinetic": -0.1}, {"jacobian": float("nan")}, {"kinetic": float("inf")}]
    for bad in bads:
        with pytest.raises(ValueError, match="finite weight"):
            snopt.ODEBlock(func, **bad)


def test_regularization_sums_the_blocks_and_snopt_trains_through_it() -> None:
    torch.manual_seed(0)
    f1, f2 = MLP(2, 6), MLP(2, 6)
    b1 = snopt.ODEBlock(f1, kinetic=0.1)
    b2 = snopt.ODEBlock(f2, jacobian=0.1)
    model = nn.Sequential(b1, b2, nn.Linear(2, 3))
    x, y = torch.randn(32, 2), torch.randint(0, 3, (32,))
    assert float(snopt.nn.regularization(model)) == 0.0  # nothing has run yet
    model(x)
    assert b1.regularization is not None and b2.regularization is not None
    torch.testing.assert_close(snopt.nn.regularization(model), b1.regularization + b2.regularization)
    opt = snopt.SNOpt(model)
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + snopt.nn.regularization(model)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    for m in (f1.l1, f2.l2):  # the collection iteration saw the regularised blocks' layers
        m2 = opt.state[m.weight]["m2"]
        assert bool(torch.isfinite(m2).all()) and float(m2.abs().sum()) > 0
