"""Claim: one `SNOpt.step` moves every preconditioned layer by exactly the eigen-corrected update (DESIGN.md §2).

The update is computed here densely from the factors the collectors gathered. With base
SGD(lr = 1, momentum 0) the parameter change of a layer is −vec⁻¹(u) (−lr·vec⁻¹(u) for lr ≠ 1), in the row-major
vec of the (d_out, d_in) [W, b] gradient matrix ∇W (vec(g āᵀ) = g ⊗ ā):

    A = U_A diag(λ_A) U_Aᵀ,  G = U_G diag(λ_G) U_Gᵀ   (λ clamped at 0; refreshed every update_freq steps)
    Q = U_G ⊗ U_A,           ĝ = Qᵀ vec(∇W)
    m2 ← α m2 + (1 − α) · B · ĝ²                     (m2 = λ_G ⊗ λ_A at a refresh; B the batch size)
    u  = Q diag(1 / (m2 + eps)) ĝ

written with dense (d_out·d_in)² matrices, independently of snopt's rotate/unrotate. With α = 1
this is KFAC with damping, u = (G ⊗ A + eps·I)⁻¹ vec(∇W), checked with a dense solve.

Tolerance: both sides are a few float64 matrix products and one eigendecomposition of the same
matrices (the same `torch.linalg.eigh` call sequence), so they agree to rounding (measured
≤ 2e-14); 1e-10 leaves room for BLAS differences. Planted bugs in the reference (m2 not updated,
the batch-size factor dropped, the old basis after a refresh) give relative errors ≥ 0.38.
"""

from collections.abc import Callable
from typing import cast

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import snopt
from snopt.testing import rel_err

DT = torch.float64
TOL = 1e-10




class MLPField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(5, 6, dtype=DT)
        self.lin2 = nn.Linear(6, 4, dtype=DT)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        z = torch.cat([x, t.to(x.dtype).expand(*x.shape[:-1], 1)], dim=-1)
        out: Tensor = self.lin2(torch.tanh(self.lin1(z)))
        return out


class ConvField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, dtype=DT)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1, bias=False, dtype=DT)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.conv2(torch.tanh(self.conv1(x)))
        return out


class MLPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(5, 4, dtype=DT)
        self.block = snopt.ODEBlock(MLPField(), method="rk4", options={"step_size": 0.25})
        self.head = nn.Linear(4, 3, dtype=DT)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.block(self.stem(x)))
        return out


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 2, 3, padding=1, dtype=DT)
        self.block = snopt.ODEBlock(ConvField(), method="dopri5", rtol=1e-6, atol=1e-8)
        self.head = nn.Linear(2 * 4 * 4, 3, dtype=DT)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.block(self.stem(x)).flatten(1))
        return out


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (MLPNet, (6, 5)),
    "conv": (ConvNet, (3, 1, 4, 4)),
}


def _data(shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    y = torch.randint(0, 3, (shape[0],), generator=torch.Generator().manual_seed(2))
    return x, y


def grad_matrix(m: nn.Module) -> Tensor:
    """[∇W, ∇b] as (d_out, d_in), written out here."""
    weight, bias = cast(Tensor, m.weight), cast(Tensor | None, m.bias)
    w = cast(Tensor, weight.grad).reshape(weight.shape[0], -1)
    return w if bias is None else torch.cat([w, cast(Tensor, bias.grad)[:, None]], dim=1)


def weight_matrix(m: nn.Module) -> Tensor:
    """[W, b] as (d_out, d_in): a copy, never a view of the parameter."""
    weight, bias = cast(Tensor, m.weight), cast(Tensor | None, m.bias)
    w = weight.detach().reshape(weight.shape[0], -1).clone()
    return w if bias is None else torch.cat([w, bias.detach()[:, None]], dim=1)


class DenseEKFAC:
    """The reference: one layer's eigenbasis and second moment, as dense matrices."""

    def __init__(self, A: Tensor, G: Tensor) -> None:
        lam_a, u_a = torch.linalg.eigh(A)
        lam_g, u_g = torch.linalg.eigh(G)
        self.q = torch.kron(u_g, u_a)
        self.m2 = torch.kron(lam_g.clamp(min=0), lam_a.clamp(min=0))
        self.A, self.G = A, G

    def update(self, grad: Tensor, *, alpha: float, eps: float, batch: float, power: float = 1.0) -> Tensor:
        g_hat = self.q.T @ grad.reshape(-1)
        self.m2 = alpha * self.m2 + (1 - alpha) * batch * g_hat**2
        return (self.q @ (g_hat / (self.m2 + eps) ** power)).reshape(grad.shape)


def snopt_steps(name: str, *, alpha: float, eps: float, steps: int, lr: float = 1.0, update_freq: int = 2,
                kl_clip: float | None = None, mutate: str | None = None, momentum: float = 0.0,
                weight_decay: float = 0.0, scope: str = "increment", power: float = 1.0,
                refresh_guard: float | None = 0.1, counts: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Per layer, the relative error of −Δθ/lr of `steps` SNOpt steps over SGD(lr, momentum, wd) vs the dense step.

    The dense step of a layer is its velocity v ← μ·v + (ν_inc·u + wd·θ), θ ← θ − lr·v (SGD's momentum, its
    weight decay added to the gradient first). With `kl_clip` and ``scope="increment"``, ν_inc = min(1,
    √(kl_clip / Σ lr²⟨u, ∇W⟩)) scales every layer's u; with ``scope="step"``, ν_inc = 1 and the whole step
    Δθ = −lr·v is scaled after it is made, v with it: ν = min(1, √(kl_clip / Σ ΔθᵀF̃Δθ)), F̃ = Q diag(m2 + eps) Qᵀ
    the dense preconditioner after this step's m2 update. A refresh whose tr(A)·tr(G) is below `refresh_guard` ×
    that of the layer's reference in use is refused (the reference is kept), and the refusals are counted as
    SNOpt counts them.
    """
    make, shape = MODELS[name]
    model = make()
    x, y = _data(shape)
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay),
                      eps=eps, alpha=alpha, update_freq=update_freq, kl_clip=kl_clip, kl_clip_scope=scope, power=power,
                      refresh_guard=refresh_guard)
    refs: dict[str, DenseEKFAC] = {}
    refused = 0
    errs: dict[str, list[float]] = {layer.name: [] for layer in opt.layers}
    velocity: dict[str, Tensor] = {}
    for k in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        if k % update_freq == 0:  # a collection iteration: read the factors before `step` consumes them
            for layer in opt.layers:
                f = layer.collector.kron_factors()[layer.name]
                old = refs.get(layer.name)
                if (refresh_guard and old is not None
                        and float(f.A.trace() * f.G.trace()) < refresh_guard * float(old.A.trace() * old.G.trace())):
                    refused += 1
                elif mutate != "stale-basis" or old is None:
                    refs[layer.name] = DenseEKFAC(f.A.clone(), f.G.clone())
        before = {layer.name: weight_matrix(layer.module) for layer in opt.layers}
        grads = {layer.name: grad_matrix(layer.module).clone() for layer in opt.layers}
        opt.step()
        expected: dict[str, Tensor] = {}
        for layer in opt.layers:
            batch = float(shape[0])
            if mutate == "no-batch-factor":
                batch = 1.0
            ref = refs[layer.name]
            expected[layer.name] = ref.update(grads[layer.name], alpha=1.0 if mutate == "frozen-m2" else alpha,
                                              eps=eps, batch=batch, power=1.0 if mutate == "wrong-power" else power)
            if alpha == 1.0 and power == 1.0:  # KFAC with damping, by a dense solve
                kfac = torch.kron(ref.G, ref.A) + eps * torch.eye(ref.q.shape[0], dtype=DT)
                direct = torch.linalg.solve(kfac, grads[layer.name].reshape(-1)).reshape(grads[layer.name].shape)
                assert rel_err(expected[layer.name], direct) < 1e-9, layer.name
        if kl_clip is not None and scope == "increment" and mutate != "no-clip":
            vg = sum(lr**2 * float((expected[n] * grads[n]).sum()) for n in expected)
            nu = min(1.0, (kl_clip / vg) ** 0.5)
            expected = {n: nu * u for n, u in expected.items()}
        for n, u in expected.items():
            d = u + weight_decay * before[n]
            velocity[n] = momentum * velocity[n] + d if n in velocity else d
        if kl_clip is not None and scope == "step" and mutate != "no-clip":
            quad = 0.0
            for n, v in velocity.items():
                step = (lr * v).reshape(-1)
                quad += float(step @ (refs[n].q @ torch.diag((refs[n].m2 + eps) ** power) @ refs[n].q.T) @ step)
            nu = min(1.0, (kl_clip / quad) ** 0.5)
            steps_taken = {n: nu * v for n, v in velocity.items()}
            if mutate != "unclipped-velocity":
                velocity = steps_taken
        else:
            steps_taken = dict(velocity)
        for layer in opt.layers:
            errs[layer.name].append(rel_err((before[layer.name] - weight_matrix(layer.module)) / lr,
                                            steps_taken[layer.name]))
    assert opt.refused_refreshes == refused
    if counts is not None:
        counts["refused"] = refused
    return errs


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("alpha", "eps"), [(0.75, 0.05), (1.0, 0.01), (0.0, 0.1)])
def test_one_step_over_sgd_lr1_equals_dense_ekfac_update(name: str, alpha: float, eps: float) -> None:
    # A refresh step: factors → eigenbasis → m2 = λ_G ⊗ λ_A → one running update. Layers: the ODE
    # block's (always) and the stem/head outside it (full_precond, static factors).
    errs = snopt_steps(name, alpha=alpha, eps=eps, steps=1)
    expected_layers = {"mlp": {"lin1", "lin2", "stem", "head"}, "conv": {"conv1", "conv2", "stem", "head"}}[name]
    assert set(errs) == expected_layers
    assert max(max(e) for e in errs.values()) < TOL, errs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_running_second_moment_and_refresh_over_four_steps(name: str) -> None:
    # update_freq = 2: refresh, running m2 in the same basis, refresh (new factors, basis, m2 reset),
    # running m2. lr = 0.01 keeps the model tame over the four steps (lr = 1 with eps = 0.05 moves
    # weights by up to ‖∇W‖/eps ≈ 30); Δθ/lr is compared.
    errs = snopt_steps(name, alpha=0.75, eps=0.05, steps=4, lr=0.01)
    assert all(len(e) == 4 for e in errs.values())
    assert max(max(e) for e in errs.values()) < TOL, errs


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("scope", "kl_clip"), [("increment", None), ("increment", 1e-3), ("step", 1e-3)])
def test_adam_scaling_in_the_eigenbasis_equals_the_dense_definition(name: str, scope: str,
                                                                    kl_clip: float | None) -> None:
    # power = 1/2: U_G (G̃ / √(m2 + eps)) U_Aᵀ (Adam's scaling in the Kronecker eigenbasis, SOAP-like), with the
    # trust region measuring steps under Q diag(√(m2 + eps)) Qᵀ; four steps over SGD with momentum, a refresh
    # and running m2 included.
    errs = snopt_steps(name, alpha=0.75, eps=1e-3, steps=4, lr=0.01, kl_clip=kl_clip, scope=scope, power=0.5,
                       momentum=0.9)
    assert max(max(e) for e in errs.values()) < TOL, errs


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kl_clip", [1e-6, 1e-3, 1e6])
def test_kl_clip_scales_every_layer_by_the_trust_region_factor(name: str, kl_clip: float) -> None:
    # The trust region: all preconditioned layers share one factor ν = min(1, √(kl_clip / Σ lr²⟨u, ∇W⟩)).
    # 1e-6 and 1e-3 clip at lr = 0.1 on these models (ν ≈ 0.003–0.1); 1e6 never does (ν = 1).
    errs = snopt_steps(name, alpha=0.75, eps=0.05, steps=3, lr=0.1, kl_clip=kl_clip)
    assert max(max(e) for e in errs.values()) < TOL, errs


@pytest.mark.parametrize("refresh_guard", [0.1, None])
def test_a_collapsed_refresh_is_refused_as_the_dense_reference_says(refresh_guard: float | None) -> None:
    # Unclipped steps at lr 0.1 move the conv model's head so far that its next factors' tr(A)·tr(G) falls
    # below 0.1× the first refresh's: with the guard the head keeps its old basis and m2, without it takes the new.
    counts: dict[str, int] = {}
    errs = snopt_steps("conv", alpha=0.75, eps=0.05, steps=3, lr=0.1, kl_clip=1e6, refresh_guard=refresh_guard,
                       counts=counts)
    assert counts["refused"] == (1 if refresh_guard else 0)
    assert max(max(e) for e in errs.values()) < TOL, errs


def test_kl_clip_bounds_the_predicted_change_and_rejects_bad_values() -> None:
    make, shape = MODELS["mlp"]
    model = make()
    x, y = _data(shape)
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), eps=0.05, kl_clip=1e-4, update_freq=1,
                      kl_clip_scope="increment")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
    refs = {}
    for layer in opt.layers:
        f = layer.collector.kron_factors()[layer.name]
        refs[layer.name] = DenseEKFAC(f.A.clone(), f.G.clone())
    grads = {layer.name: grad_matrix(layer.module).clone() for layer in opt.layers}
    before = {layer.name: weight_matrix(layer.module) for layer in opt.layers}
    opt.step()
    # The step's predicted change under the preconditioner F̃ = Q diag(m2 + eps) Qᵀ (dense, after this
    # step's m2 update): Σ Δθᵀ F̃ Δθ = kl_clip exactly when clipping is active.
    quad = 0.0
    for layer in opt.layers:
        ref = refs[layer.name]
        ref.update(grads[layer.name], alpha=0.75, eps=0.05, batch=float(shape[0]))
        f_tilde = ref.q @ torch.diag(ref.m2 + 0.05) @ ref.q.T
        d = (before[layer.name] - weight_matrix(layer.module)).reshape(-1)
        quad += float(d @ f_tilde @ d)
    assert opt.last_clip < 1.0
    assert abs(quad - 1e-4) < 1e-12
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="kl_clip"):
            snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), kl_clip=bad)
    with pytest.raises(ValueError, match="kl_clip_scope"):
        snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), kl_clip=1e-3, kl_clip_scope="velocity")


def _displacement(name: str, *, lr: float, kl_clip: float | None, full_precond: bool = True,
                  steps: int = 4) -> tuple[Tensor, list[float]]:
    """All parameters' change over `steps` SNOpt steps over SGD(lr, momentum 0.9), and each step's ν."""
    make, shape = MODELS[name]
    model = make()
    x, y = _data(shape)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), eps=0.05, update_freq=2,
                      kl_clip=kl_clip, kl_clip_scope="increment", full_precond=full_precond)
    nus = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
        nus.append(opt.last_clip)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start, nus


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_binding_trust_region_leaves_the_learning_rate_no_role(name: str) -> None:
    # Where the clip binds, the step is −lr·ν·u with lr·ν = √(kl_clip / Σ⟨u, ∇W⟩): lr cancels, and
    # momentum only sums such steps. So with every parameter in a preconditioned layer
    # (full_precond) and the clip binding on every step, lr = 0.1 and lr = 10 give the same
    # trajectory: bit for bit on the fixed grid (mlp, rk4; measured 0); to the solver's tolerance
    # with dopri5 (conv, rtol 1e-6), where the rounding-level differences (2e-17, 4e-16, 3e-13
    # after steps 1–3) flip one accept/reject decision of the step-size controller at step 4
    # (measured 8e-7; the same lr twice: 0). Without the clip they differ; so they do with the
    # stem and head left to plain SGD (full_precond=False), whose steps lr still scales.
    slow, nus_slow = _displacement(name, lr=0.1, kl_clip=1e-6)
    fast, nus_fast = _displacement(name, lr=10.0, kl_clip=1e-6)
    assert max(nus_slow) < 1.0 and max(nus_fast) < 1.0, (nus_slow, nus_fast)
    assert rel_err(fast, slow) < (1e-10 if name == "mlp" else 1e-5)
    # Unclipped, one step is enough to tell (a second at lr = 10 would make the conv field stiff and slow).
    assert rel_err(_displacement(name, lr=10.0, kl_clip=None, steps=1)[0],
                   _displacement(name, lr=0.1, kl_clip=None, steps=1)[0]) > 0.5
    outside = rel_err(_displacement(name, lr=10.0, kl_clip=1e-6, full_precond=False)[0],
                      _displacement(name, lr=0.1, kl_clip=1e-6, full_precond=False)[0])
    assert outside > 0.5


@pytest.mark.parametrize("mutate", ["frozen-m2", "no-batch-factor", "stale-basis", "no-clip", "wrong-power"])
def test_the_check_fails_on_a_wrong_reference(mutate: str) -> None:
    # The same comparison against a reference with one planted mistake: it must fail clearly.
    errs = snopt_steps("mlp", alpha=0.75, eps=0.05, steps=4, lr=0.01 if mutate != "no-clip" else 0.1,
                       kl_clip=1e-4 if mutate == "no-clip" else None, mutate=mutate,
                       power=0.5 if mutate == "wrong-power" else 1.0)
    worst = max(max(e) for e in errs.values())
    assert worst > 1e-2, errs


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kl_clip", [1e-6, 1e-3, 1e6])
@pytest.mark.parametrize("scope", ["increment", "step"])
def test_trust_region_with_momentum_and_weight_decay_matches_the_dense_step(name: str, kl_clip: float,
                                                                            scope: str) -> None:
    # SGD's momentum 0.9 and weight decay 0.01 under both trust regions: "increment" clips each u before the
    # velocity sums them; "step" clips the whole step lr·v (weight decay included) after it is made and the
    # velocity with it. 1e-6 and 1e-3 bind on every step of these models (ν 0.004–0.007 and 0.11–0.23 under
    # either scope, measured), 1e6 never does (then both are plain EKFAC + SGD).
    errs = snopt_steps(name, alpha=0.75, eps=0.05, steps=4, lr=0.1, kl_clip=kl_clip, momentum=0.9,
                       weight_decay=0.01, scope=scope)
    assert max(max(e) for e in errs.values()) < TOL, errs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_without_momentum_the_step_and_increment_trust_regions_agree(name: str) -> None:
    # With plain SGD the whole step is −lr·ν·u: the same predicted change Σ lr²⟨u, ∇W⟩ = Σ ΔθᵀF̃Δθ, so the same ν.
    def run(scope: str) -> tuple[Tensor, list[float]]:
        make, shape = MODELS[name]
        model = make()
        x, y = _data(shape)
        opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), eps=0.05, update_freq=2,
                          kl_clip=1e-4, kl_clip_scope=scope)
        nus = []
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
            opt.step()
            nus.append(opt.last_clip)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), nus

    (inc, nus_inc), (step, nus_step) = run("increment"), run("step")
    assert max(nus_inc) < 1.0
    assert nus_step == pytest.approx(nus_inc, rel=1e-9)
    assert rel_err(step, inc) < 1e-9


@pytest.mark.parametrize("mutate", ["no-clip", "unclipped-velocity"])
def test_the_step_check_fails_on_a_wrong_reference(mutate: str) -> None:
    # The whole-step comparison against a reference that does not clip, or clips the step but not the velocity.
    errs = snopt_steps("mlp", alpha=0.75, eps=0.05, steps=4, lr=0.1, kl_clip=1e-4, momentum=0.9,
                       weight_decay=0.01, scope="step", mutate=mutate)
    worst = max(max(e) for e in errs.values())
    assert worst > 1e-2, errs
