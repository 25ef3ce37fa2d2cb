"""The public `snopt.nn.CNF`: its log-density and samples against exact formulas, its gradients against
backprop through plain torchdiffeq, and what `SNOpt` finds and guards in it."""

import pytest
import torch
import torchdiffeq
from torch import Tensor, nn

import snopt
from snopt.nn import CNF, CNFField, DivergenceField
from snopt.nn._cnf import cnf_log_density

F64 = torch.float64
TIGHT = {"rtol": 1e-12, "atol": 1e-12}


class LinearVelocity(nn.Module):
    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return x @ self.a.T


def _linear_cnf(d: int, t1: float) -> tuple[CNF, Tensor]:
    a = 0.6 * torch.randn(d, d, generator=torch.Generator().manual_seed(d), dtype=F64)
    return CNF(d, field=DivergenceField(LinearVelocity(a), divergence="exact"), t1=t1, **TIGHT), a


@pytest.mark.parametrize("d", [2, 3])
def test_log_density_of_a_linear_flow_is_the_pushforward_gaussian(d: int) -> None:
    # dx/dt = A x pushes N(0, I) at t1 back to x = expm(-A t1) z: N(0, M Mᵀ) with M = expm(-A t1).
    cnf, a = _linear_cnf(d, t1=0.7)
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    m = torch.linalg.matrix_exp(-a * 0.7)
    exact = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=F64), covariance_matrix=m @ m.T)
    torch.testing.assert_close(cnf(x), exact.log_prob(x), rtol=0, atol=1e-8)


def test_samples_of_a_linear_flow_are_the_noise_pulled_back() -> None:
    cnf, a = _linear_cnf(2, t1=0.5)
    x = cnf.sample(7, generator=torch.Generator().manual_seed(4))
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert x.shape == (7, 2) and x.dtype == F64
    torch.testing.assert_close(x, z @ torch.linalg.matrix_exp(-a * 0.5).T, rtol=0, atol=1e-8)


def test_gradients_equal_backprop_through_plain_torchdiffeq() -> None:
    torch.manual_seed(0)
    cnf = CNF(2, hidden=8, num_layers=1, **TIGHT).to(F64)
    x = torch.randn(6, 2, dtype=F64)
    ours = torch.autograd.grad(cnf(x).mean(), list(cnf.parameters()))
    direct = cnf_log_density(cnf.field, x, 1.0, torchdiffeq.odeint, method="dopri5", **TIGHT).mean()
    ref = torch.autograd.grad(direct, list(cnf.parameters()))
    for g, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)


def test_snopt_finds_every_layer_of_the_field_and_guards_its_solves() -> None:
    torch.manual_seed(0)
    cnf = CNF(2, hidden=8, num_layers=2)
    opt = snopt.SNOpt(cnf)
    linears = [m for m in cnf.field.modules() if isinstance(m, nn.Linear)]
    found = {id(layer.module) for layer in opt.layers}
    assert linears and found == {id(m) for m in linears}
    assert cnf.block.guard is opt.recovery
    x = torch.randn(64, 2) * torch.tensor([1.0, 0.3])
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = -cnf(x).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for m in linears:  # the collection iteration filled every layer's second moments
        assert bool(torch.isfinite(opt.state[m.weight]["m2"]).all())
        assert float(opt.state[m.weight]["m2"].abs().sum()) > 0
    assert cnf.block.stats.nfe_forward > 0 and all(map(lambda v: v == v, losses))


def test_a_field_without_a_divergence_is_refused() -> None:
    with pytest.raises(TypeError, match="must be a DivergenceField"):
        CNF(2, field=nn.Linear(2, 2))  # type: ignore[arg-type]
    assert isinstance(CNF(3).field, CNFField)


def test_data_that_requires_grad_gets_the_same_density_and_its_exact_score() -> None:
    # The forward solve's first evaluation sees the data itself; a no-grad view of a leaf that requires grad
    # once made the divergence vanish there (autograd reports such a view as unused).
    torch.manual_seed(0)
    cnf = CNF(2, hidden=8, num_layers=1, **TIGHT).to(F64)
    x = torch.randn(6, 2, dtype=F64)
    xg = x.clone().requires_grad_(True)
    logp = cnf(xg)
    torch.testing.assert_close(logp, cnf(x), rtol=0, atol=1e-12)
    (score,) = torch.autograd.grad(logp.sum(), xg)
    xr = x.clone().requires_grad_(True)
    direct = cnf_log_density(cnf.field, xr, 1.0, torchdiffeq.odeint, method="dopri5", **TIGHT)
    (ref,) = torch.autograd.grad(direct.sum(), xr)
    torch.testing.assert_close(score, ref, rtol=1e-6, atol=1e-8)
