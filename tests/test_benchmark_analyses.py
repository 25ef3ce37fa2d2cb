"""The measurements behind #35's analyses: the field Jacobian of benchmarks/stiffness.py and SOAP's basis in
benchmarks/soap_basis.py, each against an independent dense computation."""

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.apps._common import continue_log, logged_runs
from benchmarks.apps._digits import ConvODEFunc
from benchmarks.soap_basis import GradientBasisSNOpt
from benchmarks.stiffness import at_level, jacobians, parse_setting


def test_field_jacobian_matches_autograd_per_sample() -> None:
    torch.manual_seed(0)
    func = ConvODEFunc(2).double()
    z = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    params = dict(func.named_parameters())
    jac = jacobians(func, params, t, z)
    for i in range(len(z)):
        ref = torch.autograd.functional.jacobian(lambda zi: func(t, zi[None]).reshape(-1), z[i])
        torch.testing.assert_close(jac[i], ref.reshape(18, 18), rtol=1e-12, atol=1e-12)


def test_the_stiffness_gradient_is_the_derivative_of_the_frobenius_norm() -> None:
    torch.manual_seed(1)
    func = ConvODEFunc(2).double()
    z = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor(0.5, dtype=torch.float64)
    w = func.conv1.conv.weight.detach().clone()

    def s_of(weight: torch.Tensor) -> torch.Tensor:
        params = {k: v.detach() for k, v in func.named_parameters()}
        params["conv1.conv.weight"] = weight
        return jacobians(func, params, t, z).square().sum((1, 2)).mean()

    assert torch.autograd.gradcheck(s_of, (w.requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_settings_and_levels_parse() -> None:
    assert parse_setting("adam@0.01") == ("adam", 0.01, {})
    assert parse_setting("snopt+kinetic") == ("snopt", None, {"kinetic": 0.01})
    run = {"rows": [{"iteration": 1, "train_loss": 2.0}, {"iteration": 6, "train_loss": 0.4},
                    {"iteration": 11, "train_loss": 0.2}]}
    hit = at_level(run, 0.3)
    assert hit is not None and hit["iteration"] == 11
    assert at_level(run, 0.1) is None


def test_soap_basis_diagonalises_the_gradient_outer_products_since_the_last_refresh() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = GradientBasisSNOpt(net, update_freq=3)
    grads = []
    for _ in range(4):  # refreshes at steps 0 and 3: the second one's window is steps 1..3
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()  # type: ignore[no-untyped-call]
        grads.append(torch.cat([net[0].weight.grad, net[0].bias.grad[:, None]], 1).double())  # type: ignore[index]
        opt.step()
    left = sum(g @ g.T for g in grads[1:])
    right = sum(g.T @ g for g in grads[1:])
    st = opt.state[net[0].weight]
    for u, m in ((st["U_G"].double(), left), (st["U_A"].double(), right)):
        rot = u.T @ m @ u
        off = rot - torch.diag(torch.diag(rot))
        assert float(off.abs().max()) < 1e-5 * float(m.abs().max())
    # m2 is the diagonal of K-FAC's A ⊗ G in that basis: non-negative and not λ_G λ_Aᵀ of the gradient factors
    assert bool((st["m2"] >= 0).all())
    assert not torch.allclose(st["m2"], torch.outer(st["lam_G"], st["lam_A"]))


def test_logged_runs_commit_the_log_and_read_it_back_without_it(tmp_path: Path) -> None:
    log, committed = tmp_path / "runs.jsonl", tmp_path / "runs.jsonl.gz"
    with pytest.raises(SystemExit, match="No runs logged"):
        logged_runs(log, committed, trained=False)
    log.write_text(json.dumps({"a": 1}) + "\n" + json.dumps({"a": 2}) + "\n")
    assert logged_runs(log, committed, trained=True) == [{"a": 1}, {"a": 2}]
    log.unlink()
    assert logged_runs(log, committed, trained=False) == [{"a": 1}, {"a": 2}]


def test_a_fresh_clone_continues_from_the_committed_runs_and_loses_none(tmp_path: Path) -> None:
    log, committed = tmp_path / "logs" / "runs.jsonl", tmp_path / "runs.jsonl.gz"
    key = lambda r: (r["a"],)  # noqa: E731
    assert continue_log(log, committed, key) == set() and not log.exists()
    committed.write_bytes(gzip.compress((json.dumps({"a": 1}) + "\n").encode()))
    assert continue_log(log, committed, key) == {(1,)}  # a fresh clone: the committed run is not retrained
    with log.open("a") as fh:
        fh.write(json.dumps({"a": 2}) + "\n")
    assert logged_runs(log, committed, trained=True) == [{"a": 1}, {"a": 2}]  # the commit keeps the old run
    assert continue_log(log, committed, key) == {(1,), (2,)}  # an existing log is continued, not reseeded
    assert continue_log(log, committed, key, fresh=True) == set() and log.read_text() == ""
