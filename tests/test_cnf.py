"""FFJORD-style CNF pieces: the log-density against exact change of variables, the divergences, gradients."""

import math

import pytest
import torch
import torchdiffeq
from torch import Tensor, nn

import snopt
from snopt.nn._cnf import (
    CNFField,
    ConcatSquashLinear,
    ConcatSquashNet,
    DivergenceField,
    cnf_forward,
    cnf_log_density,
    cnf_sample,
    standard_normal_logprob,
)

F64 = torch.float64
TIGHT = {"method": "dopri5", "rtol": 1e-12, "atol": 1e-12}
SOLVERS = {"snopt": snopt.odeint, "torchdiffeq": torchdiffeq.odeint}


class LinearVelocity(nn.Module):
    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return x @ self.a.T


def _random_matrix(d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.6 * torch.randn(d, d, generator=g, dtype=F64)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("d", [2, 3])
def test_linear_flow_matches_exact_change_of_variables(solver: str, d: int) -> None:
    # dx/dt = A x  =>  z = expm(A t1) x  and  log p(x) = log N(z) + log|det expm(A t1)| = log N(z) + t1 tr(A).
    a = _random_matrix(d, seed=d)
    t1 = 0.8
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    field = DivergenceField(LinearVelocity(a), divergence="exact")
    z, delta_logp = cnf_forward(field, x, t1, SOLVERS[solver], **TIGHT)
    z_exact = x @ torch.linalg.matrix_exp(a * t1).T
    torch.testing.assert_close(z, z_exact, rtol=0, atol=1e-9)
    torch.testing.assert_close(delta_logp, torch.full((6,), -t1 * float(torch.trace(a)), dtype=F64), rtol=0, atol=1e-9)
    logp = cnf_log_density(field, x, t1, SOLVERS[solver], **TIGHT)
    exact = standard_normal_logprob(z_exact) + t1 * torch.trace(a)
    torch.testing.assert_close(logp, exact, rtol=0, atol=1e-8)
    # Sign check against an independent formula: the pushforward density of N(0, I) under x = expm(-A t1) z
    # is N(0, Σ) with Σ = M Mᵀ, M = expm(-A t1).
    m = torch.linalg.matrix_exp(-a * t1)
    gauss = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=F64), covariance_matrix=m @ m.T)
    torch.testing.assert_close(logp, gauss.log_prob(x), rtol=0, atol=1e-8)


def test_linear_flow_hutchinson_is_unbiased_in_the_log_density() -> None:
    # For a linear field the Hutchinson estimate with fixed ε is t1·εᵀAε; its mean over ε is t1·tr(A).
    a = _random_matrix(3, seed=7)
    t1 = 0.5
    x = torch.randn(1, 3, generator=torch.Generator().manual_seed(2), dtype=F64).repeat(2000, 1)  # 2000 draws of ε
    field = DivergenceField(LinearVelocity(a), divergence="hutchinson")
    torch.manual_seed(0)
    with torch.no_grad():
        logp = cnf_log_density(field, x, t1, torchdiffeq.odeint, method="rk4", options={"step_size": 0.05})
    z_exact = x[:1] @ torch.linalg.matrix_exp(a * t1).T
    exact = float(standard_normal_logprob(z_exact) + t1 * torch.trace(a))
    assert logp.std() > 0  # the estimate really varies with ε
    assert abs(float(logp.mean()) - exact) < 5 * float(logp.std()) / math.sqrt(len(logp))


def test_hutchinson_divergence_is_unbiased() -> None:
    torch.manual_seed(0)
    dim, batch, draws = 4, 3, 4000
    field = CNFField(dim, hidden=16, num_layers=2, activation="tanh", divergence="exact").to(F64)
    z = torch.randn(batch, dim, dtype=F64)
    t = torch.tensor(0.3, dtype=F64)
    logp = torch.zeros(batch, dtype=F64)
    with torch.no_grad():
        _, neg_div_exact = field(t, (z, logp))
    # Cross-check the exact divergence against the trace of the full Jacobian.
    jac = torch.func.vmap(torch.func.jacrev(lambda zz: field.velocity(t, zz[None])[0]))(z)
    torch.testing.assert_close(-neg_div_exact, jac.diagonal(dim1=1, dim2=2).sum(-1))

    field.divergence = "hutchinson"
    zr = z.repeat(draws, 1)
    field.sample_noise(zr, generator=torch.Generator().manual_seed(3))
    assert field.noise is not None
    assert set(field.noise.unique().tolist()) == {-1.0, 1.0}
    with torch.no_grad():
        _, neg_div_est = field(t, (zr, zr.new_zeros(len(zr))))
    est = -neg_div_est.reshape(draws, batch)
    mean, std = est.mean(0), est.std(0)
    assert bool((std > 0).all())
    assert bool(((mean - (-neg_div_exact)).abs() < 5 * std / math.sqrt(draws)).all())


def test_hutchinson_requires_noise() -> None:
    field = CNFField(2, hidden=8, num_layers=1, divergence="hutchinson")
    z = torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="sample_noise"):
        field(torch.tensor(0.0), (z, torch.zeros(4)))
    field.sample_noise(torch.randn(5, 2))
    with pytest.raises(RuntimeError, match="shaped like z"):
        field(torch.tensor(0.0), (z, torch.zeros(4)))


def test_concat_squash_linear_shapes_and_formula() -> None:
    torch.manual_seed(0)
    layer = ConcatSquashLinear(3, 5)
    x = torch.randn(7, 3)
    for t in (torch.tensor(0.4), torch.tensor([0.4])):
        out = layer(t, x)
        assert out.shape == (7, 5)
        w, b = layer.linear.weight, layer.linear.bias
        gate = torch.sigmoid(layer.hyper_gate.weight[:, 0] * 0.4 + layer.hyper_gate.bias)
        expected = (x @ w.T + b) * gate + layer.hyper_bias.weight[:, 0] * 0.4
        torch.testing.assert_close(out, expected)
    net = ConcatSquashNet(3, hidden=11, num_layers=3)
    assert net(torch.tensor(0.0), x).shape == (7, 3)
    assert len(net.layers) == 4
    with pytest.raises(ValueError):
        ConcatSquashNet(3, num_layers=0)
    with pytest.raises(ValueError):
        ConcatSquashNet(3, activation="sine")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CNFField(2, divergence="trace")  # type: ignore[arg-type]


def test_standard_normal_logprob() -> None:
    z = torch.randn(5, 3, dtype=F64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(standard_normal_logprob(z), expected)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_gradient_adjoint_matches_backprop_through_torchdiffeq(divergence: str) -> None:
    torch.manual_seed(0)
    field = CNFField(2, hidden=8, num_layers=1, activation="tanh", divergence=divergence).to(F64)  # type: ignore[arg-type]
    x = torch.randn(5, 2, dtype=F64)
    kw = {"method": "dopri5", "rtol": 1e-10, "atol": 1e-10}
    grads = {}
    for name, solver in SOLVERS.items():
        field.zero_grad()
        torch.manual_seed(1)  # the same Hutchinson noise for both solvers
        nll = -cnf_log_density(field, x, 1.0, solver, **kw).mean()
        nll.backward()
        grads[name] = [p.grad.clone() for p in field.parameters() if p.grad is not None]
        assert len(grads[name]) == len(list(field.parameters()))
        assert all(bool(torch.isfinite(g).all()) for g in grads[name])
    assert any(float(g.abs().max()) > 1e-6 for g in grads["snopt"])
    for ga, gb in zip(grads["snopt"], grads["torchdiffeq"], strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-8)


def test_density_integrates_to_one_and_sampling_inverts() -> None:
    torch.manual_seed(0)
    field = CNFField(2, hidden=16, num_layers=2, activation="softplus").to(F64)
    lin = torch.linspace(-6.0, 6.0, 81, dtype=F64)
    grid = torch.cartesian_prod(lin, lin)
    kw = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-8}
    with torch.no_grad():
        logp = cnf_log_density(field, grid, 1.0, torchdiffeq.odeint, **kw)
        mass = float(logp.exp().sum()) * float(lin[1] - lin[0]) ** 2
        assert abs(mass - 1.0) < 1e-4
        x = torch.randn(8, 2, dtype=F64)
        z, _ = cnf_forward(field, x, 1.0, torchdiffeq.odeint, **kw)
        back = cnf_sample(field, z, 1.0, torchdiffeq.odeint, **kw)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)


def test_float32_training_step_with_snopt_odeint() -> None:
    torch.manual_seed(0)
    field = CNFField(2, hidden=8, num_layers=1, divergence="hutchinson")
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    x = torch.randn(16, 2)
    nll = -cnf_log_density(field, x, 0.5, snopt.odeint, method="rk4", options={"step_size": 0.125}).mean()
    opt.zero_grad()
    nll.backward()
    opt.step()
    assert torch.isfinite(nll)
    with pytest.raises(ValueError):
        cnf_log_density(field, x, 0.0, snopt.odeint)
