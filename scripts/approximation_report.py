"""How good is SNOpt's Kronecker approximation? Writes docs/approximation.md.

For a few small Neural ODE blocks (MLP fields of width 12 and 16, a tiny Conv2d field; batch 1
and 8, or 1 and 2 for the convolution) this compares, per Linear/Conv2d layer of the vector field:

* the relative Frobenius error ‖K − H‖/‖H‖ of the dense block K = A ⊗ G (in the row-major [W, b]
  order) against H, the layer's block of the exact generalised Gauss-Newton matrix from
  ``snopt.second_order(..., gauss_newton=True)`` (dopri5, rtol 1e-9), for
  - GGN-root factors (`snopt.curvature.ggn_factors`: the roots of Φ_xx carried by the adjoint),
    on a fine rk4 grid (h = 1/64: isolates the Kronecker approximation) and with the paper's
    dopri5 rtol = atol = 1e-3 accepted steps (adds the Riemann-sum error of a few coarse steps);
  - EKFAC: H's own diagonal in the GGN-root KFAC eigenbasis (the best any eigen-correction can do);
  - the empirical factors SNOpt trains with (cotangent of the actual loss, per-sample scaling);
* the cosine between preconditioned directions and the exact damped GGN direction (H + eps·I)⁻¹ g
  on the ODE block's parameters, with H block-diagonal per layer or the full GGN, eps = 0.05
  (SNOpt's default): the gradient itself, KFAC ((A ⊗ G + eps·I)⁻¹ g per layer, i.e. SNOpt with
  α = 1) with GGN-root and with empirical factors, EKFAC with H's exact diagonal in the GGN-root
  KFAC eigenbasis, and SNOpt's first EKFAC step with empirical factors (α = 0.75:
  m2 = α λ_G λ_Aᵀ + (1 − α)·B·G̃²).

Run: ``python scripts/approximation_report.py`` (about a minute on one CPU core).
"""

import math
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchdiffeq
from torch import Tensor, nn

import snopt
from snopt.curvature import FactorCollector, KronFactors, ggn_factors, kron_block
from snopt.losses import LinearCrossEntropy, MSELoss

DT = torch.float64
EPS = 0.05
ALPHA = 0.75
T1 = 1.0
OUT = Path(__file__).resolve().parents[1] / "docs" / "approximation.md"
LossFn = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def _init_(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / math.sqrt(fan_in))


class MLPField(nn.Module):
    """F(t, x) = W2 tanh(W1 [x; t] + b1) + b2."""

    def __init__(self, dim: int, width: int, seed: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim + 1, width, dtype=DT)
        self.lin2 = nn.Linear(width, dim, dtype=DT)
        _init_(self, seed)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Evaluate the field."""
        z = torch.cat([x, t.to(x.dtype).expand(*x.shape[:-1], 1)], dim=-1)
        out: Tensor = self.lin2(torch.tanh(self.lin1(z)))
        return out


class ConvField(nn.Module):
    """F(t, x) = conv2(tanh(conv1(x))) on (B, 2, 4, 4) images, 3×3 kernels, padding 1."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, dtype=DT)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1, dtype=DT)
        _init_(self, seed)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Evaluate the field."""
        out: Tensor = self.conv2(torch.tanh(self.conv1(x)))
        return out


@dataclass(frozen=True)
class Case:
    """One model at one batch size."""

    name: str
    loss_name: str
    batch: int
    build: Callable[[int], tuple[nn.Module, Tensor, LossFn]]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp_mse(width: int) -> Callable[[int], tuple[nn.Module, Tensor, LossFn]]:
    """An MLP field with an MSE loss on x(1), as a function of the batch size."""
    def build(batch: int) -> tuple[nn.Module, Tensor, LossFn]:
        x0 = torch.randn(batch, 4, generator=_gen(1), dtype=DT)
        target = torch.randn(batch, 4, generator=_gen(2), dtype=DT)
        return MLPField(4, width, seed=0), x0, MSELoss(target)
    return build


def mlp_ce(width: int) -> Callable[[int], tuple[nn.Module, Tensor, LossFn]]:
    """An MLP field with cross-entropy through a fixed 3-class linear readout, as a function of the batch size."""
    def build(batch: int) -> tuple[nn.Module, Tensor, LossFn]:
        x0 = torch.randn(batch, 4, generator=_gen(1), dtype=DT)
        readout = torch.randn(3, 4, generator=_gen(3), dtype=DT)
        labels = torch.randint(0, 3, (batch,), generator=_gen(4))
        return MLPField(4, width, seed=0), x0, LinearCrossEntropy(readout, None, labels)
    return build


def conv_mse(batch: int) -> tuple[nn.Module, Tensor, LossFn]:
    """The Conv2d field with an MSE loss on x(1)."""
    x0 = torch.randn(batch, 2, 4, 4, generator=_gen(1), dtype=DT)
    target = torch.randn(batch, 2, 4, 4, generator=_gen(2), dtype=DT)
    return ConvField(seed=0), x0, MSELoss(target)


CASES = [
    Case("MLP field, width 12", "MSE", 1, mlp_mse(12)),
    Case("MLP field, width 12", "MSE", 8, mlp_mse(12)),
    Case("MLP field, width 16", "cross-entropy (linear readout)", 1, mlp_ce(16)),
    Case("MLP field, width 16", "cross-entropy (linear readout)", 8, mlp_ce(16)),
    Case("Conv2d field, 2→3→2 ch, 4×4", "MSE", 1, conv_mse),
    Case("Conv2d field, 2→3→2 ch, 4×4", "MSE", 2, conv_mse),
]


# ----------------------------------------------------------------------------------------------
# Quantities
# ----------------------------------------------------------------------------------------------

def layer_index(func: nn.Module, layer: str) -> Tensor:
    """Indices (in the flat `parameters()` order) of a layer's [W, b] entries, row-major."""
    offsets: dict[str, tuple[int, torch.Size]] = {}
    off = 0
    for n, p in func.named_parameters():
        offsets[n] = (off, p.shape)
        off += p.numel()
    w_off, w_shape = offsets[f"{layer}.weight"]
    k = w_shape[1:].numel()
    b_off = offsets[f"{layer}.bias"][0] if f"{layer}.bias" in offsets else None
    idx: list[int] = []
    for i in range(w_shape[0]):
        idx += [w_off + i * k + j for j in range(k)]
        if b_off is not None:
            idx.append(b_off + i)
    return torch.tensor(idx)


def rel(a: Tensor, b: Tensor) -> float:
    """Relative Frobenius error ‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())


def cos(a: Tensor, b: Tensor) -> float:
    """Cosine of the angle between two vectors."""
    return float(a @ b / (a.norm() * b.norm()))


def empirical_factors(block: snopt.ODEBlock, x0: Tensor, loss_fn: LossFn) -> dict[str, KronFactors]:
    """The factors SNOpt trains with: one forward/backward of the actual loss."""
    collector = FactorCollector(block.func, mode="ode")
    block.observer, collector.enabled = collector, True
    try:
        loss_fn(block(x0)).backward()
    finally:
        block.observer = None
        collector.remove()
        block.func.zero_grad(set_to_none=True)
    return collector.kron_factors()


def kfac_direction(f: KronFactors, grad: Tensor, *, alpha: float, batch: float) -> Tensor:
    """SNOpt's update for one layer after a refresh, in the row-major vec: Q diag(1/(m2 + eps)) Qᵀ g."""
    lam_a, u_a = torch.linalg.eigh(f.A)
    lam_g, u_g = torch.linalg.eigh(f.G)
    q = torch.kron(u_g, u_a)
    g_hat = q.T @ grad
    m2 = alpha * torch.kron(lam_g.clamp(min=0), lam_a.clamp(min=0)) + (1 - alpha) * batch * g_hat**2
    return q @ (g_hat / (m2 + EPS))


@dataclass
class Result:
    """The numbers of one case."""

    case: Case
    layers: list[tuple[str, int, float, float, float, float]]  # name, size, kfac fine, kfac dopri, ekfac, emp
    directions: list[tuple[str, float, float]]  # label, cos vs block-diagonal, cos vs full
    seconds: float


def evaluate(case: Case) -> Result:
    """Exact GGN, factors and directions for one case."""
    start = time.perf_counter()
    func, x0, loss_fn = case.build(case.batch)
    t_span = torch.tensor([0.0, T1], dtype=DT)
    so = snopt.second_order(func, x0, t_span, loss_fn, gauss_newton=True, rtol=1e-9, atol=1e-11)
    hess, grad = so.hess_params, so.grad_params
    fine = snopt.ODEBlock(func, t1=T1, method="rk4", options={"step_size": 1 / 64})
    coarse = snopt.ODEBlock(func, t1=T1, method="dopri5", rtol=1e-3, atol=1e-3)
    ggn_fine = ggn_factors(fine, x0, loss_fn)
    ggn_coarse = ggn_factors(coarse, x0, loss_fn)
    emp = empirical_factors(fine, x0, loss_fn)
    names = [n for n, m in func.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    idx = {n: layer_index(func, n) for n in names}
    all_idx = torch.cat([idx[n] for n in names])
    assert sorted(all_idx.tolist()) == list(range(hess.shape[0])), "every parameter is in a Kron layer"

    layers = []
    for n in names:
        h = hess[idx[n]][:, idx[n]]
        k = kron_block(ggn_fine[n])
        q = torch.kron(torch.linalg.eigh(ggn_fine[n].G)[1], torch.linalg.eigh(ggn_fine[n].A)[1])
        ekfac = q @ torch.diag(torch.diagonal(q.T @ h @ q)) @ q.T
        layers.append((n, int(idx[n].numel()), rel(k, h), rel(kron_block(ggn_coarse[n]), h), rel(ekfac, h),
                       rel(kron_block(emp[n]), h)))

    g = grad[all_idx]
    h_full = hess[all_idx][:, all_idx]
    eye = torch.eye(h_full.shape[0], dtype=DT)
    exact_full = torch.linalg.solve(h_full + EPS * eye, g)
    exact_block = torch.cat([torch.linalg.solve(hess[idx[n]][:, idx[n]] + EPS * torch.eye(idx[n].numel(), dtype=DT),
                                                grad[idx[n]]) for n in names])

    def direction(factors: dict[str, KronFactors], alpha: float) -> Tensor:
        return torch.cat([kfac_direction(factors[n], grad[idx[n]], alpha=alpha, batch=float(case.batch))
                          for n in names])

    def best_ekfac_direction(n: str) -> Tensor:
        q = torch.kron(torch.linalg.eigh(ggn_fine[n].G)[1], torch.linalg.eigh(ggn_fine[n].A)[1])
        diag = torch.diagonal(q.T @ hess[idx[n]][:, idx[n]] @ q)
        return q @ ((q.T @ grad[idx[n]]) / (diag + EPS))

    candidates = {
        "gradient g": g,
        "KFAC, GGN-root factors (α = 1)": direction(ggn_fine, 1.0),
        "EKFAC, GGN-root basis, exact diagonal diag(QᵀHQ)": torch.cat([best_ekfac_direction(n) for n in names]),
        "KFAC, empirical factors (α = 1)": direction(emp, 1.0),
        "SNOpt's step: EKFAC, empirical factors (α = 0.75)": direction(emp, ALPHA),
        "exact block-diagonal GGN direction": exact_block,
    }
    directions = [(label, cos(d, exact_block), cos(d, exact_full)) for label, d in candidates.items()]
    return Result(case, layers, directions, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def machine() -> str:
    """CPU model, threads and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} thread(s); Python {platform.python_version()}, "
            f"torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, float64")


def render(results: list[Result], total: float) -> str:
    """The Markdown report."""
    lines = [
        "# How close is SNOpt's Kronecker approximation to the exact Gauss-Newton matrix?",
        "",
        "Generated by `python scripts/approximation_report.py` (do not edit by hand).",
        f"Machine: {machine()}. Runtime {total:.0f} s.",
        "",
        "Setup: an ODE block x ↦ x(t1), t ∈ [0, 1], with the vector field named below; loss on x(1) (MSE with",
        "`snopt.losses.MSELoss`, or cross-entropy through a fixed linear readout, `LinearCrossEntropy`). The",
        "reference H is the exact generalised Gauss-Newton matrix J_θᵀ Φ_xx J_θ of the continuous model from",
        "`snopt.second_order(..., gauss_newton=True)` (dopri5, rtol 1e-9); a layer's block is taken in the",
        "row-major order of its (d_out, d_in + 1) [W, b] matrix, the order of `kron_block(order=\"row\")`.",
        "",
        "## 1. Per-layer block error ‖K − H_layer‖_F / ‖H_layer‖_F",
        "",
        "* **KFAC-GGN, rk4 1/64**: A ⊗ G from `snopt.curvature.ggn_factors` (each root of Φ_xx carried back by",
        "  the adjoint; A = ∫ E[ā āᵀ] dt, G = ∫ Σ_roots Σ_batch g gᵀ dt) on a fine rk4 grid, so the error is the",
        "  Kronecker (and time/batch-sharing) approximation alone.",
        "* **KFAC-GGN, dopri5 1e-3**: the same with the paper's solver setting; the factors are then left",
        "  Riemann sums over the few accepted backward steps (2–4 here), which adds quadrature error.",
        "* **EKFAC (best diag.)**: H's own diagonal in the KFAC eigenbasis, Q diag(Qᵀ H Q) Qᵀ: the closest any",
        "  eigen-corrected (EKFAC) matrix in that basis can get.",
        "* **empirical (SNOpt)**: the factors SNOpt trains with (the cotangent of the actual loss, scaled to",
        "  per-sample gradients: an empirical Fisher), rk4 1/64.",
        "",
        "| model | loss | B | layer | #params | KFAC-GGN, rk4 1/64 | KFAC-GGN, dopri5 1e-3 | EKFAC (best diag.) "
        "| empirical (SNOpt) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, size, k_fine, k_coarse, ek, emp in r.layers:
            lines.append(f"| {r.case.name} | {r.case.loss_name} | {r.case.batch} | `{name}` | {size} | {k_fine:.2e} "
                         f"| {k_coarse:.2e} | {ek:.2e} | {emp:.2e} |")
    lines += [
        "",
        f"## 2. Direction quality: cosine with the exact damped GGN direction (H + eps·I)⁻¹ g, eps = {EPS}",
        "",
        "Over all parameters of the ODE block. *block-diag.*: H restricted to its per-layer diagonal blocks",
        "(what a per-layer preconditioner aims at); *full*: the whole GGN including cross-layer blocks.",
        f"SNOpt's step is its first update after a refresh: m2 = α λ_G λ_Aᵀ + (1 − α)·B·G̃², α = {ALPHA}, then",
        "U_G (G̃ / (m2 + eps)) U_Aᵀ per layer.",
        "",
        "| model | loss | B | direction | cos vs block-diag. | cos vs full |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for label, c_block, c_full in r.directions:
            lines.append(f"| {r.case.name} | {r.case.loss_name} | {r.case.batch} | {label} | {c_block:.4f} "
                         f"| {c_full:.4f} |")
    labels = [label for label, _, _ in results[0].directions if label != "gradient g"][:-1]
    wins = []
    for label in labels:
        n = sum(dict((lb, c) for lb, c, _ in r.directions)[label] > r.directions[0][1] for r in results)
        wins.append(f"{label}: {n}/{len(results)}")
    lines += [
        "",
        "Cases in which a direction is closer (cos vs block-diag.) to the exact damped GGN direction than the",
        "gradient is: " + "; ".join(wins) + ".",
    ]
    lines += [
        "",
        "## Reading the tables",
        "",
        "* KFAC is exact only in a narrow regime (one datum, one location, layer inputs and output cotangents",
        "  constant in time; checked to ~1e-15 in `verification/test_kron_factors.py`). Here the inputs",
        "  move along the trajectory and over the batch, so the GGN-root blocks are off by the amounts in",
        "  column 6; the best EKFAC diagonal in the same eigenbasis (column 8) is never worse, by construction.",
        "* The empirical factors estimate a different matrix (the empirical Fisher of the per-sample losses,",
        "  rank ≤ B per time sample), so their block error against the GGN is large, especially for B = 1;",
        "  that is the price of the paper's choice of statistics, not a quadrature error.",
        "* Coarse adaptive steps (dopri5 at 1e-3) add the Riemann-sum error of a handful of steps to the",
        "  Kronecker error.",
        "* Directions: the cosines compare a damped (eps) preconditioned step with the exact damped GGN",
        "  step; the gradient's own cosine is the baseline to beat. They depend on eps relative to the",
        "  curvature's scale. A smaller matrix error does not imply a better direction: the Frobenius error",
        "  is dominated by H's large eigenvalues, the damped inverse by its small ones (EKFAC's best diagonal",
        "  can point worse than KFAC). Directions built from the empirical factors are judged here against",
        "  the GGN, which they do not estimate; where they lose to the gradient that is a statement about",
        "  the empirical Fisher on these tiny problems, not about the quadrature or the EKFAC algebra (both",
        "  verified exactly in verification/test_kron_factors.py and verification/test_snopt_update.py).",
        "",
        "Per-case runtime (s): " + ", ".join(f"{r.case.name} B={r.case.batch}: {r.seconds:.1f}" for r in results) + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Compute every case and write docs/approximation.md."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = []
    for case in CASES:
        results.append(evaluate(case))
        print(f"{case.name} ({case.loss_name}), B={case.batch}: {results[-1].seconds:.1f} s", flush=True)
    text = render(results, time.perf_counter() - start)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
