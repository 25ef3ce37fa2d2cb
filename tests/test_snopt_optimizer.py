"""SNOpt honours the torch.optim.Optimizer contract: loops, groups, schedulers, state_dict, failures, errors."""

import copy
import io
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import snopt
from snopt.curvature import CurvatureWarning

DT = torch.float64




class Field(nn.Module):
    def __init__(self, dim: int = 4, width: int = 6) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim + 1, width, dtype=DT)
        self.lin2 = nn.Linear(width, dim, dtype=DT)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        z = torch.cat([x, t.to(x.dtype).expand(*x.shape[:-1], 1)], dim=-1)
        out: Tensor = self.lin2(torch.tanh(self.lin1(z)))
        return out


class Net(nn.Module):
    """stem Linear → ODE block → [LayerNorm → GRUCell] → head Linear."""

    def __init__(self, seed: int = 0, *, method: str = "rk4", extra: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Linear(5, 4, dtype=DT)
        opts: dict[str, Any] = {"options": {"step_size": 0.25}} if method == "rk4" else {"rtol": 1e-4, "atol": 1e-6}
        self.block = snopt.ODEBlock(Field(), method=method, **opts)
        self.extra = extra
        self.norm = nn.LayerNorm(4, dtype=DT) if extra else None
        self.gru = nn.GRUCell(4, 4, dtype=DT) if extra else None
        self.head = nn.Linear(4, 3, dtype=DT)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(self.stem(x))
        if self.norm is not None and self.gru is not None:
            h = self.gru(self.norm(h), h)
        out: Tensor = self.head(h)
        return out


X = torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
Y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))


def loss_of(model: nn.Module) -> Tensor:
    return F.cross_entropy(model(X), Y)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, after: Callable[[], None] | None = None,
          ) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if after is not None:
            after()
    return losses


BASES: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive bit-for-bit equality of nested dicts/lists/tensors."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# ----------------------------------------------------------------------------------------------
# The plain training loop
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", sorted(BASES))
def test_plain_training_loop_decreases_the_loss(base: str) -> None:
    model = Net()
    opt = snopt.SNOpt(model, BASES[base](model.parameters()), eps=0.05, update_freq=2)
    losses = train(model, opt, 6)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    # Every ODE-block layer and (full_precond) stem/head got an eigenbasis and a second moment.
    names = {layer.name for layer in opt.layers if "m2" in opt.state[layer.weight]}
    assert names == {"lin1", "lin2", "stem", "head"}


def test_snopt_update_differs_from_the_base_alone() -> None:
    a, b = Net(), Net()
    train(a, snopt.SNOpt(a, torch.optim.SGD(a.parameters(), lr=0.1), update_freq=1), 1)
    train(b, torch.optim.SGD(b.parameters(), lr=0.1), 1)
    pa, pb = params_of(a), params_of(b)
    assert not torch.equal(pa["block.func.lin1.weight"], pb["block.func.lin1.weight"])


def test_param_groups_use_their_own_lr_and_eps() -> None:
    # Two groups: the ODE block (lr 0.1, eps 0.01) and the rest (lr 0.05, eps 0.1). After one step
    # (identical gradients in every run), each group's parameters must have moved exactly as in a
    # one-group run with that group's settings, and differently from a run with the other's.
    def groups(model: Net) -> list[dict[str, Any]]:
        return [{"params": model.block.parameters(), "lr": 0.1, "snopt_eps": 0.01},
                {"params": [*model.stem.parameters(), *model.head.parameters()], "lr": 0.05, "snopt_eps": 0.1}]

    def run(model: Net, base: torch.optim.Optimizer, **kw: Any) -> dict[str, Tensor]:
        # no trust region: its one factor ν is shared by all groups, which this test keeps apart
        train(model, snopt.SNOpt(model, base, update_freq=2, kl_clip=None, **kw), 1)
        return params_of(model)

    m = Net()
    two = run(m, torch.optim.SGD(groups(m), lr=1.0))
    m = Net()
    block_like = run(m, torch.optim.SGD(m.parameters(), lr=0.1), eps=0.01)
    m = Net()
    rest_like = run(m, torch.optim.SGD(m.parameters(), lr=0.05), eps=0.1)
    for name, p in two.items():
        ref = block_like if name.startswith("block.") else rest_like
        other = rest_like if name.startswith("block.") else block_like
        assert torch.equal(p, ref[name]), name
        assert not torch.equal(p, other[name]), name
    opt = snopt.SNOpt(m, torch.optim.SGD(groups(m), lr=1.0))
    assert [(g["lr"], g["snopt_eps"], g["snopt_alpha"]) for g in opt.param_groups] == [
        (0.1, 0.01, 0.75), (0.05, 0.1, 0.75)]
    assert opt.param_groups is opt.base.param_groups


def test_lr_scheduler_on_snopt_drives_the_base_lr() -> None:
    model = Net()
    # kl_clip off: the whole-step trust region would move the parameters after the base step
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.2), update_freq=2, kl_clip=None)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for k in range(4):
        lr = 0.2 * 0.5**k
        assert opt.base.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-15)
        before = params_of(model)
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
        # SGD without momentum: Δθ = −lr · (preconditioned) grad, which SNOpt left in .grad.
        for n, p in model.named_parameters():
            assert p.grad is not None
            torch.testing.assert_close(p.detach() - before[n], -lr * p.grad, rtol=1e-12, atol=1e-15)
        sched.step()


def test_snopt_eps_and_alpha_do_not_clobber_adam_eps() -> None:
    # Adam's own "eps" (1e-8) and SNOpt's damping (0.05) live side by side in the param groups.
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8), eps=0.05, alpha=0.5)
    group = opt.base.param_groups[0]
    assert (group["eps"], group["snopt_eps"], group["snopt_alpha"]) == (1e-8, 0.05, 0.5)
    rms = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.99, eps=1e-8)
    opt2 = snopt.SNOpt(model, rms, eps=0.1, alpha=0.25)
    assert [(g["alpha"], g["eps"], g["snopt_alpha"], g["snopt_eps"]) for g in opt2.param_groups] == [
        (0.99, 1e-8, 0.25, 0.1)]


# ----------------------------------------------------------------------------------------------
# state_dict round trip
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("saved_at", [2, 3])
def test_state_dict_round_trip_resumes_bit_identically(base: str, saved_at: int) -> None:
    # update_freq = 3: refreshes at steps 0, 3, 6. Saving after step 2 resumes right before a
    # collection/refresh step; saving after step 3 resumes right after one; both cross step 6.
    def make(seed: int) -> tuple[Net, snopt.SNOpt]:
        model = Net(seed)
        return model, snopt.SNOpt(model, BASES[base](model.parameters()), eps=0.05, update_freq=3)

    model, opt = make(0)
    train(model, opt, saved_at)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 5)
    expected = params_of(model)

    fresh, fresh_opt = make(123)
    assert not torch.equal(fresh.stem.weight, model.stem.weight)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    train(fresh, fresh_opt, 5)
    got = params_of(fresh)
    for n in expected:
        assert torch.equal(got[n], expected[n]), n
    assert_same(fresh_opt.state_dict(), opt.state_dict())


# ----------------------------------------------------------------------------------------------
# Failures are contained
# ----------------------------------------------------------------------------------------------

def test_non_finite_gradient_skips_the_step_with_a_warning() -> None:
    # without recovery (with it, the previous step is undone: tests/test_recovery.py)
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), update_freq=2,
                      recovery=False)
    train(model, opt, 1)
    params, state = params_of(model), copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_of(model).backward()
    assert model.head.weight.grad is not None
    model.head.weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="Non-finite gradient: SNOpt step skipped"):
        opt.step()
    assert_same(params_of(model), params)
    assert_same(opt.state_dict(), state)
    train(model, opt, 2)  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_eigh_failure_warns_and_falls_back_without_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_eigh(*args: Any, **kwargs: Any) -> Any:
        raise torch.linalg.LinAlgError("planted failure")  # type: ignore[attr-defined]

    model = Net()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), update_freq=5)
    opt.zero_grad()
    loss_of(model).backward()
    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    with pytest.warns(CurvatureWarning, match="did not converge"):
        opt.step()
    monkeypatch.undo()
    for layer in opt.layers:
        st = opt.state[layer.weight]
        assert torch.equal(st["U_A"], torch.eye(st["U_A"].shape[0], dtype=DT))
        assert torch.equal(st["lam_G"], torch.ones_like(st["lam_G"]))
    train(model, opt, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_factors_keep_the_previous_basis() -> None:
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), update_freq=1)
    train(model, opt, 1)
    layer = next(la for la in opt.layers if la.name == "lin1")
    basis = opt.state[layer.weight]["U_A"].clone()
    opt.zero_grad()
    loss_of(model).backward()
    layer.collector.factors["lin1"].A[0, 0] = float("inf")
    with pytest.warns(CurvatureWarning, match="Non-finite Kronecker factors for layer 'lin1'"):
        opt.step()
    assert torch.equal(opt.state[layer.weight]["U_A"], basis)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# full_precond: which layers are preconditioned
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("full_precond", [True, False])
def test_full_precond_decides_for_layers_outside_ode_blocks(full_precond: bool) -> None:
    snopt_model, base_model = Net(extra=True), Net(extra=True)
    opt = snopt.SNOpt(snopt_model, torch.optim.SGD(snopt_model.parameters(), lr=0.1, momentum=0.9),
                      full_precond=full_precond, update_freq=1)
    # One step: both models then see identical gradients (a later step's gradients differ because the
    # preconditioned layers have moved differently), so any difference is the preconditioner's.
    train(snopt_model, opt, 1)
    train(base_model, torch.optim.SGD(base_model.parameters(), lr=0.1, momentum=0.9), 1)
    got, ref = params_of(snopt_model), params_of(base_model)
    for name in got:
        owner = name.split(".")[0]
        if owner in ("norm", "gru"):
            untouched = True  # not nn.Linear/nn.Conv2d: the base optimizer's update alone
        elif owner in ("stem", "head"):
            untouched = not full_precond
        else:
            untouched = False  # inside the ODE block: always preconditioned
        assert torch.equal(got[name], ref[name]) == untouched, name
    expected = {"lin1", "lin2"} | ({"stem", "head"} if full_precond else set())
    assert {layer.name for layer in opt.layers} == expected


# ----------------------------------------------------------------------------------------------
# Construction errors
# ----------------------------------------------------------------------------------------------

class NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3, dtype=DT))
        self.norm = nn.LayerNorm(3, dtype=DT)


ERRORS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"eps": 0.0}, ValueError, r"Invalid eps: 0.0 \(must be > 0\)"),
    ({"eps": -1.0}, ValueError, r"Invalid eps: -1.0"),
    ({"alpha": -0.1}, ValueError, r"Invalid alpha: -0.1 \(must be in \[0, 1\]\)"),
    ({"alpha": 1.5}, ValueError, r"Invalid alpha: 1.5"),
    ({"update_freq": 0}, ValueError, r"Invalid update_freq: 0 \(must be an integer ≥ 1\)"),
    ({"update_freq": 2.5}, ValueError, r"Invalid update_freq: 2.5"),
    ({"damping": -1e-3}, ValueError, r"Invalid damping: -0.001"),
    ({"sampling": "random"}, ValueError, r"Invalid sampling: 'random' \(must be 'steps' or 'grid'\)"),
    ({"grid_h": 0.0}, ValueError, r"Invalid grid_h: 0.0"),
    ({"time_sharing": "share"}, ValueError, r"Invalid time_sharing: 'share' \(must be 'expand' or 'reduce'\)"),
    ({"sampling": "grid"}, ValueError, r"sampling='grid' needs an adaptive method; block uses 'rk4'"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), ERRORS, ids=[m.split(":")[0][:28] for _, _, m in ERRORS])
def test_construction_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    model = Net()
    with pytest.raises(error, match=match):
        snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_model_without_kron_layers_is_rejected() -> None:
    model = NoLayers()
    with pytest.raises(ValueError, match="has no nn.Linear/nn.Conv2d layer .* nothing to precondition"):
        snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1))
    net = Net()  # layers exist, but the base optimises none of their weights
    with pytest.raises(ValueError, match="nothing to precondition"):
        snopt.SNOpt(net, torch.optim.SGD([net.stem.bias], lr=0.1))


def test_base_must_be_an_optimizer() -> None:
    model = Net()
    with pytest.raises(TypeError, match="`base` must be a torch.optim.Optimizer; got list"):
        snopt.SNOpt(model, list(model.parameters()))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Modes, and the cost of not collecting
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "method"), [({"time_sharing": "reduce"}, "rk4"),
                                              ({"sampling": "grid", "grid_h": 0.125}, "dopri5")])
def test_reduce_and_grid_modes_train(mode: dict[str, Any], method: str) -> None:
    model = Net(method=method)
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), update_freq=2, **mode)
    opt.zero_grad()
    loss_of(model).backward()
    factors = opt.collectors[0].kron_factors()
    seen = [(f.steps, float(f.weight)) for f in factors.values()]
    # rk4 step 1/4 on [0, 1]: 4 folds; grid h = 1/8: 8 folds; weights sum to t1 − t0 either way.
    assert seen and all(s == (4 if method == "rk4" else 8) and abs(w - 1.0) < 1e-12 for s, w in seen), seen
    opt.step()
    losses = train(model, opt, 4)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all("m2" in opt.state[la.weight] for la in opt.layers)


def test_non_collection_iterations_fold_nothing() -> None:
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), update_freq=3)
    folds: list[str] = []
    for c in opt.collectors:
        real = c._fold
        c._fold = lambda name, *a, real=real: (folds.append(name), real(name, *a))[1]  # type: ignore[method-assign]
    train(model, opt, 1)  # collection + refresh
    assert folds
    folds.clear()
    for _ in range(2):  # steps 1, 2: no collection
        opt.zero_grad()
        loss_of(model).backward()
        assert folds == []
        for c in opt.collectors:
            assert not c.enabled and c._latest == {}
            assert all(float(f.weight) == 0 and f.steps == 0 for f in c.factors.values())
        opt.step()
    assert all(c.enabled for c in opt.collectors)  # step 3 collects again
    train(model, opt, 1)
    assert folds


def test_step_accepts_a_closure_and_zero_grad_clears_everything() -> None:
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1))

    def closure() -> float:
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return float(loss.detach())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = opt.step(closure)
    assert isinstance(loss, float)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def _factors(opt: snopt.SNOpt) -> dict[str, tuple[Tensor, Tensor, int]]:
    return {f"{i}.{name}": (f.A.clone(), f.G.clone(), f.steps)
            for i, c in enumerate(opt.collectors) for name, f in c.kron_factors().items()}


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_collect_takes_the_factors_from_its_loss_and_leaves_the_gradients_alone(method: str) -> None:
    other = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(9))
    # Reference: an SNOpt whose one backward pass is that of the "other" loss.
    ref_model = Net(method=method)
    ref = snopt.SNOpt(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1))
    F.cross_entropy(ref_model(X), other).backward()
    expected = _factors(ref)
    plain = Net(method=method)
    snopt.SNOpt(plain, torch.optim.SGD(plain.parameters(), lr=0.1))  # same observer on the block's solves
    loss_of(plain).backward()

    model = Net(method=method)
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert opt.collecting
    logits = model(X)
    opt.collect(F.cross_entropy(logits, other))
    assert not opt.collecting
    assert all(p.grad is None for p in model.parameters())  # collect leaves .grad untouched
    F.cross_entropy(logits, Y).backward()  # the training loss's backward, same forward graph
    got = _factors(opt)
    assert set(got) == set(expected) and len(got) == 4  # the block's lin1, lin2; stem and head (static)
    for k, (a, g, steps) in expected.items():
        assert got[k][2] == steps  # nothing folded twice (the static layers' hooks fire on both passes)
        assert torch.equal(got[k][0], a) and torch.equal(got[k][1], g), k
    for p, q in zip(model.parameters(), plain.parameters()):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad)
    opt.step()  # refreshes from the collected factors
    assert all("m2" in opt.state[la.weight] for la in opt.layers)


def test_collect_off_a_collection_iteration_or_with_a_bad_loss_raises() -> None:
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), update_freq=2)
    with pytest.raises(ValueError, match="scalar"):
        opt.collect(F.cross_entropy(model(X), Y, reduction="none"))
    with pytest.raises(ValueError, match="requires_grad"):
        opt.collect(torch.tensor(1.0))
    train(model, opt, 1)
    assert not opt.collecting
    with pytest.raises(RuntimeError, match="collecting"):
        opt.collect(loss_of(model))


def test_training_with_sampled_labels_collects_every_update_freq_steps() -> None:
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), update_freq=2)
    gen = torch.Generator().manual_seed(3)
    calls: list[int] = []
    losses = []
    for k in range(6):
        opt.zero_grad()
        logits = model(X)
        if opt.collecting:
            calls.append(k)
            opt.collect(snopt.losses.sampled_cross_entropy(logits, gen))
        loss = F.cross_entropy(logits, Y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert calls == [0, 2, 4]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_factor_decay_keeps_a_running_average_of_the_collected_factors(decay: float) -> None:
    # Record what each refresh collects (before any averaging), then check the stored average and that the
    # eigenbasis diagonalises it: A_avg = decay·A_prev_avg + (1 − decay)·A_new, the first refresh as collected.
    torch.manual_seed(0)
    func = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    class F(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = func

        def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x)
            return out

    model = nn.Sequential(snopt.ODEBlock(F(), rtol=1e-6, atol=1e-8), nn.Linear(3, 2).double())
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.05), update_freq=1, factor_decay=decay)
    seen: list[dict[str, Any]] = []
    for c in opt.collectors:
        orig = c.kron_factors

        def recorded(orig: Any = orig) -> Any:
            out = orig()
            seen.append({k: (v.A.clone(), v.G.clone()) for k, v in out.items()})
            return out

        c.kron_factors = recorded  # type: ignore[method-assign]
    layer = next(la for la in opt.layers if la.module is func[0])
    expected_a: torch.Tensor | None = None
    expected_g: torch.Tensor | None = None
    for i in range(4):
        x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        a_new, g_new = next(d[layer.name] for d in seen[-len(opt.collectors):] if layer.name in d)
        expected_a = a_new if expected_a is None else decay * expected_a + (1 - decay) * a_new
        expected_g = g_new if expected_g is None else decay * expected_g + (1 - decay) * g_new
        st = opt.state[layer.weight]
        torch.testing.assert_close(st["A_avg"], expected_a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(st["G_avg"], expected_g, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(st["U_A"] @ torch.diag(st["lam_A"]) @ st["U_A"].T, expected_a, rtol=1e-8,
                                   atol=1e-10)
        if i > 0:  # the average really differs from the latest collection
            assert not torch.allclose(st["A_avg"], a_new)


def test_factor_decay_is_validated() -> None:
    model = Net()
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="factor_decay"):
            snopt.SNOpt(model, factor_decay=bad)


def test_blend_factors_is_the_weighted_average_and_aliases_nothing() -> None:
    from snopt.curvature import KronFactors, blend_factors

    g = torch.Generator().manual_seed(0)
    new = KronFactors(A=torch.rand(3, 3, generator=g), G=torch.rand(2, 2, generator=g), weight=torch.tensor(1.0))
    prev = (torch.rand(3, 3, generator=g), torch.rand(2, 2, generator=g))
    out = blend_factors(new, prev, 0.75)
    torch.testing.assert_close(out.A, 0.75 * prev[0] + 0.25 * new.A)
    torch.testing.assert_close(out.G, 0.75 * prev[1] + 0.25 * new.G)
    first = blend_factors(new, None, 0.75)  # nothing to average with: the new factors, copied
    assert torch.equal(first.A, new.A) and first.A.data_ptr() != new.A.data_ptr()
    resized = blend_factors(new, (torch.ones(4, 4), torch.ones(2, 2)), 0.75)  # a layer that changed shape
    assert torch.equal(resized.A, new.A)


def _scaled_step(opt: snopt.SNOpt, model: nn.Module, scale: float) -> None:
    opt.zero_grad()
    (scale * loss_of(model)).backward()
    opt.step()


def _bases(opt: snopt.SNOpt) -> list[list[Tensor]]:
    return [[opt.state[la.weight][k].clone() for k in ("U_A", "U_G", "lam_A", "lam_G")] for la in opt.layers]


@pytest.mark.parametrize(("scale", "refused"), [(0.3, True), (0.32, False)])
def test_refresh_guard_refuses_exactly_the_refreshes_whose_curvature_collapsed(scale: float, refused: bool) -> None:
    # lr 0 keeps the parameters, so the same batch gives the same A and a G scaled by scale² (the loss's
    # cotangents scale by `scale`): tr(A)·tr(G) falls to 0.09 (< guard 0.1, refused) or 0.1024 (installed).
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.0), update_freq=1, refresh_guard=0.1)
    _scaled_step(opt, model, 1.0)
    first = _bases(opt)
    assert opt.refused_refreshes == 0
    _scaled_step(opt, model, scale)
    after = _bases(opt)
    if refused:
        assert opt.refused_refreshes == len(opt.layers)
        assert all(torch.equal(a, b) for la, lb in zip(first, after, strict=True) for a, b in zip(la, lb, strict=True))
    else:
        assert opt.refused_refreshes == 0
        for (_, _, lam_a0, lam_g0), (_, _, lam_a1, lam_g1) in zip(first, after, strict=True):
            torch.testing.assert_close(lam_a1, lam_a0, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(lam_g1, scale**2 * lam_g0, rtol=1e-8, atol=1e-14)


def test_refresh_guard_off_installs_every_refresh() -> None:
    for guard in (None, 0.0):
        model = Net()
        opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.0), update_freq=1, refresh_guard=guard)
        _scaled_step(opt, model, 1.0)
        first = _bases(opt)
        _scaled_step(opt, model, 1e-3)
        assert opt.refused_refreshes == 0
        for (_, _, _, lam_g0), (_, _, _, lam_g1) in zip(first, _bases(opt), strict=True):
            torch.testing.assert_close(lam_g1, 1e-6 * lam_g0, rtol=1e-8, atol=1e-20)


def test_refresh_guard_compares_with_the_last_installed_curvature_and_its_count_is_saved() -> None:
    # Two collapsed refreshes in a row are both refused (the second is not compared with the first), a
    # recovered one is installed; the count survives state_dict → load_state_dict and the recovery's counters.
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.0), update_freq=1)
    assert opt.refresh_guard == 0.1  # the default
    n = len(opt.layers)
    for scale, expected in ((1.0, 0), (0.1, n), (0.1, 2 * n), (0.5, 2 * n)):
        _scaled_step(opt, model, scale)
        assert opt.refused_refreshes == expected
    sd = opt.state_dict()
    other_model = Net()
    other = snopt.SNOpt(other_model, torch.optim.SGD(other_model.parameters(), lr=0.0), update_freq=1)
    other.load_state_dict(copy.deepcopy(sd))
    assert other.refused_refreshes == 2 * n
    saved = opt.counters()
    _scaled_step(opt, model, 0.01)
    assert opt.refused_refreshes == 3 * n
    opt.restore_counters(saved)
    assert opt.refused_refreshes == 2 * n


def test_refresh_guard_is_validated() -> None:
    model = Net()
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="refresh_guard"):
            snopt.SNOpt(model, refresh_guard=bad)
