"""Step recovery (`snopt.optim.StepRecovery`): a step that breaks a solve is undone exactly and training goes on.

Failures are planted in the vector field or the head as functions of the parameters: a `Trap` fires
only at parameters it has been told are "bad" (those a given step produced), so the restored
parameters work again, as for a real step that made the dynamics blow up.
"""

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import snopt
from snopt.optim import StepRejectedWarning

DT = torch.float64


class Trap:
    """Fires while the watched tensor equals one of the recorded values (bit for bit)."""

    def __init__(self) -> None:
        self.bad: list[Tensor] = []
        self.watched: Tensor | None = None

    def arm(self, watched: Tensor) -> None:
        self.watched = watched
        self.bad.append(watched.detach().clone())

    def fires(self) -> bool:
        w = self.watched
        return w is not None and any(torch.equal(w, b) for b in self.bad)


class Field(nn.Module):
    def __init__(self, where: str = "forward") -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 6, dtype=DT)
        self.lin2 = nn.Linear(6, 4, dtype=DT)
        self.trap = Trap()
        self.where = where  # "forward": the forward solve blows up; "backward": only the adjoint's evaluations do

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.lin2(torch.tanh(self.lin1(x)))
        if self.trap.fires() and (self.where == "forward" or torch.is_grad_enabled()):
            return out * float("inf")
        return out


class Net(nn.Module):
    def __init__(self, seed: int = 0, where: str = "forward", method: str = "dopri5") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Linear(5, 4, dtype=DT)
        opts: dict[str, Any] = {"options": {"step_size": 0.25}} if method == "rk4" else {"rtol": 1e-5, "atol": 1e-7}
        self.block = snopt.ODEBlock(Field(where), method=method, **opts)
        self.head = nn.Linear(4, 3, dtype=DT)
        self.head_trap = Trap()

    @property
    def field(self) -> Field:
        f = self.block.func
        assert isinstance(f, Field)
        return f

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.block(self.stem(x)))
        return out * float("nan") if self.head_trap.fires() else out


X = torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
Y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))


def make(where: str = "forward", **kw: Any) -> tuple[Net, snopt.SNOpt]:
    model = Net(where=where)
    return model, snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), update_freq=2,
                              **kw)


def iteration(model: Net, opt: snopt.SNOpt, x: Tensor = X, y: Tensor = Y) -> Tensor:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def states(opt: snopt.SNOpt) -> dict[str, Any]:
    """The optimizer state a step changes (the recovery's own counters left out)."""
    sd = copy.deepcopy(opt.state_dict())
    sd.pop("recovery")
    return sd


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("decay", [0.0, 0.5], ids=["no-factor-average", "factor-average"])
@pytest.mark.parametrize("refresh", [False, True], ids=["plain-step", "refresh-step"])
def test_a_forward_failure_undoes_the_step_exactly_and_the_loop_sees_a_normal_output(refresh: bool,
                                                                                    decay: float) -> None:
    model, opt = make(factor_decay=decay)
    for _ in range(2 if refresh else 3):  # update_freq 2: the step of index 2 refreshes the eigenbases, 3 does not
        iteration(model, opt)
    before_p, before_s = params(model), states(opt)
    iteration(model, opt)  # the step to be undone
    model.field.trap.arm(model.field.lin1.weight)  # its parameters make the forward solve blow up
    with pytest.raises(snopt.SolverError):  # without a guard, the same forward fails
        snopt.odeint(model.field, model.stem(X).detach(), torch.tensor([0.0, 1.0], dtype=DT))
    opt.zero_grad()
    with pytest.warns(StepRejectedWarning, match="undone because a forward ODE solve failed"):
        out = model(X)
    assert_same(params(model), before_p)
    assert_same(states(opt), before_s)
    torch.testing.assert_close(out, Net.forward(model, X), rtol=0, atol=0)  # the rerun at the restored parameters
    stats = opt.recovery.stats if opt.recovery is not None else None
    assert stats is not None and (stats.rejected, stats.forward_failures, stats.step_scale) == (1, 1, 0.25)
    F.cross_entropy(out, Y).backward()
    opt.step()  # a normal step from the restored point
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_backward_failure_is_undone_at_the_next_step() -> None:
    model, opt = make(where="backward")
    iteration(model, opt)
    before_p, before_s = params(model), states(opt)
    iteration(model, opt)
    model.field.trap.arm(model.field.lin1.weight)
    opt.zero_grad()
    loss = F.cross_entropy(model(X), Y)  # the forward solve works
    loss.backward()  # the adjoint's does not: absorbed as NaN gradients
    assert model.field.lin1.weight.grad is not None and torch.isnan(model.field.lin1.weight.grad).all()
    with pytest.warns(StepRejectedWarning, match="adjoint backward ODE solve failed"):
        opt.step()
    assert_same(params(model), before_p)
    assert_same(states(opt), before_s)
    assert opt.recovery is not None and opt.recovery.stats.backward_failures == 1
    assert all(p.grad is None for p in model.parameters())
    iteration(model, opt)  # and training goes on


def test_a_non_finite_output_or_gradient_is_undone() -> None:
    model, opt = make()
    iteration(model, opt)
    before_p = params(model)
    iteration(model, opt)
    model.head_trap.watched = model.head.weight
    model.head_trap.bad.append(model.head.weight.detach().clone())
    with pytest.warns(StepRejectedWarning, match="output was not finite"):
        out = model(X)
    assert torch.isfinite(out).all()
    assert_same(params(model), before_p)
    # a non-finite gradient (e.g. from the loss) after a step undoes that step
    opt.zero_grad()
    F.cross_entropy(out, Y).backward()
    opt.step()
    before_p = params(model)
    iteration(model, opt)
    opt.zero_grad()
    F.cross_entropy(model(X), Y).backward()
    assert model.head.bias.grad is not None
    model.head.bias.grad[0] = float("nan")
    opt.step()  # the warning was shown once already
    assert_same(params(model), before_p)
    assert opt.recovery is not None
    s = opt.recovery.stats
    assert (s.rejected, s.nonfinite_outputs, s.nonfinite_gradients) == (2, 1, 1)
    assert s.step_scale == pytest.approx(0.25 * 1.02 * 0.25)  # one validated step between the two undos


class StemNet(Net):
    """Net whose stem (the layers before the ODE block) blows up at trapped parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_trap = Trap()

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        out: Tensor = self.head(self.block(h * float("inf") if self.stem_trap.fires() else h))
        return out


def test_a_step_that_breaks_the_layers_before_the_block_is_undone() -> None:
    # The block's y0 is then non-finite: without a pending step that is the user's input error
    # (NonFiniteStateError, a ValueError); after an SNOpt step it is the step's fault and is undone.
    model = StemNet()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), update_freq=2)
    model.stem_trap.arm(model.stem.weight)
    with pytest.raises(snopt.NonFiniteStateError, match="`y0` contains non-finite values"):
        model(X)
    model.stem_trap.bad.clear()
    iteration(model, opt)
    before_p, before_s = params(model), states(opt)
    iteration(model, opt)
    model.stem_trap.arm(model.stem.weight)
    opt.zero_grad()
    with pytest.warns(StepRejectedWarning, match="undone because a forward ODE solve failed"):
        out = model(X)
    assert torch.isfinite(out).all()
    assert_same(params(model), before_p)
    assert_same(states(opt), before_s)
    assert opt.recovery is not None and opt.recovery.stats.forward_failures == 1
    F.cross_entropy(out, Y).backward()
    opt.step()  # training goes on from the restored point


def test_a_failure_at_parameters_the_user_set_still_raises() -> None:
    model, opt = make()
    model.field.trap.arm(model.field.lin1.weight)  # no step taken yet: nothing to undo
    with pytest.raises(snopt.SolverError, match="forward ODE solve"):
        model(X)
    model, opt = make()
    iteration(model, opt)
    model.field.trap.arm(torch.zeros(1))  # every parameter value fails now, the restored ones too
    with pytest.warns(StepRejectedWarning), pytest.raises(snopt.SolverError):
        model(X)  # undone once; the rerun at the user's parameters raises


def test_recovery_off_raises_as_before() -> None:
    model, opt = make(recovery=False)
    iteration(model, opt)
    model.field.trap.arm(model.field.lin1.weight)
    with pytest.raises(snopt.SolverError):
        model(X)


def test_later_steps_are_scaled_by_the_step_scale() -> None:
    model, opt = make()
    iteration(model, opt)
    iteration(model, opt)
    model.field.trap.arm(model.field.lin1.weight)
    with pytest.warns(StepRejectedWarning):
        out = model(X)
    opt.zero_grad()
    F.cross_entropy(out, Y).backward()
    twin_model = Net()
    twin_model.load_state_dict(model.state_dict())
    twin = snopt.SNOpt(twin_model, torch.optim.SGD(twin_model.parameters(), lr=0.1, momentum=0.9), update_freq=2)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the tensors
    twin.zero_grad()
    F.cross_entropy(twin_model(X), Y).backward()
    assert twin.recovery is not None
    twin.recovery.stats.step_scale = 1.0
    start = params(model)
    opt.step()
    twin.step()
    for p0, p, q in zip(start, model.parameters(), twin_model.parameters(), strict=True):
        torch.testing.assert_close(p - p0, 0.25 * (q - p0), rtol=1e-12, atol=1e-15)
    buf, twin_buf = opt.base.state[model.stem.weight]["momentum_buffer"], twin.base.state[
        twin_model.stem.weight]["momentum_buffer"]
    torch.testing.assert_close(buf, 0.25 * twin_buf, rtol=1e-12, atol=1e-15)


def test_an_lr_scheduler_edit_after_the_step_survives_the_undo() -> None:
    model, opt = make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    iteration(model, opt)
    sched.step()
    iteration(model, opt)
    sched.step()
    lr = opt.param_groups[0]["lr"]
    model.field.trap.arm(model.field.lin1.weight)
    with pytest.warns(StepRejectedWarning):
        model(X)
    assert opt.param_groups[0]["lr"] == lr == pytest.approx(0.025)


def test_gradient_accumulation_drops_the_gradients_of_the_rejected_parameters() -> None:
    model, opt = make()
    iteration(model, opt)
    iteration(model, opt)
    x1, y1, x2, y2 = X[:4], Y[:4], X[4:], Y[4:]
    opt.zero_grad()
    (F.cross_entropy(model(x1), y1) / 2).backward()  # micro-batch 1 at the step's parameters
    model.field.trap.arm(model.field.lin1.weight)
    with pytest.warns(StepRejectedWarning):
        out2 = model(x2)  # micro-batch 2 fails: undone, rerun at the restored parameters
    (F.cross_entropy(out2, y2) / 2).backward()
    got = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    ref, ref_opt = make()  # an SNOpt-managed block, collecting as `model`'s is (its backward then solves alike)
    ref_opt._set_collecting(opt.collecting)
    ref.load_state_dict(model.state_dict())
    (F.cross_entropy(ref(x2), y2) / 2).backward()
    for g, p in zip(got, ref.parameters(), strict=True):
        assert g is not None and p.grad is not None
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def test_a_checkpoint_with_a_pending_step_resumes_bit_identically() -> None:
    def run(split: int | None) -> list[Tensor]:
        model, opt = make()
        for it in range(6):
            if it == 3:
                model.field.trap.arm(model.field.lin1.weight)  # the step of iteration 2 will be undone
            if split is not None and it == split:
                saved_m, saved_o = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
                bad = list(model.field.trap.bad)
                model, opt = make()
                model.load_state_dict(saved_m)
                opt.load_state_dict(saved_o)
                model.field.trap.bad, model.field.trap.watched = bad, model.field.lin1.weight
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", StepRejectedWarning)
                iteration(model, opt)
        assert opt.recovery is not None and opt.recovery.stats.rejected == 1
        return params(model)

    straight = run(None)
    assert_same(run(3), straight)  # saved with the step of iteration 2 pending, its failure still to come


def test_an_undo_restores_state_keys_the_step_created() -> None:
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.Adam(model.parameters(), lr=1e-2), update_freq=2)
    iteration(model, opt)  # Adam's state is created by this first step
    model.field.trap.arm(model.field.lin1.weight)
    opt.zero_grad()
    with pytest.warns(StepRejectedWarning):
        model(X)
    assert len(opt.base.state) == 0 and opt._k == 0
    assert all(len(opt.state[la.weight]) == 0 for la in opt.layers)


def test_recovery_hyperparameters_are_checked() -> None:
    model = Net()
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), recovery=False)
    with pytest.raises(ValueError, match="Invalid shrink"):
        snopt.optim.StepRecovery(opt, model, shrink=1.5)
    with pytest.raises(ValueError, match="Invalid regrow"):
        snopt.optim.StepRecovery(opt, model, regrow=0.5)
