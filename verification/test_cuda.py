"""CPU/GPU agreement: the same problem on CUDA and on the CPU gives the same derivatives (skipped without CUDA)."""

from pathlib import Path

import pytest
import torch

import snopt

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
F64 = torch.float64


class Field(torch.nn.Module):
    def __init__(self, d: int = 3, width: int = 16) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(d + 1, width)
        self.l2 = torch.nn.Linear(width, d)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.expand(*x.shape[:-1], 1)
        out: torch.Tensor = self.l2(torch.tanh(self.l1(torch.cat([x, tt], -1))))
        return out


def _problem(device: str, dtype: torch.dtype) -> tuple[Field, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    f = Field().to(device=device, dtype=dtype)
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    t = torch.tensor([0.0, 0.6, 1.2], dtype=dtype, device=device)
    return f, x0, t


def _grads(device: str, dtype: torch.dtype, method: str) -> list[torch.Tensor]:
    f, x0, t = _problem(device, dtype)
    x0.requires_grad_(True)
    t.requires_grad_(True)
    opts = {"step_size": 0.01} if method == "rk4" else {}
    ys = snopt.odeint(f, x0, t, method=method, options=opts, rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad((ys ** 2).sum(), (x0, t, *f.parameters()))
    return [g.detach().cpu() for g in grads]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@cuda
@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_odeint_gradients_agree_cpu_gpu_float64(method: str) -> None:
    cpu, gpu = _grads("cpu", F64, method), _grads("cuda", F64, method)
    # Same float64 arithmetic up to reduction order: agreement far below the solver tolerance.
    assert max(_rel(g, c) for g, c in zip(gpu, cpu)) < 1e-7


@cuda
def test_odeint_float32_on_gpu_close_to_float64() -> None:
    ref, gpu = _grads("cpu", F64, "rk4"), _grads("cuda", torch.float32, "rk4")
    # float32 round-off accumulated over 120 rk4 steps.
    assert max(_rel(g.double(), c) for g, c in zip(gpu, ref)) < 1e-3


@cuda
def test_hvp_and_second_order_agree_cpu_gpu() -> None:
    out = {}
    for device in ("cpu", "cuda"):
        f, x0, _ = _problem(device, F64)
        t = torch.tensor([0.0, 1.0], dtype=F64, device=device)
        loss = snopt.losses.MSELoss(torch.zeros(5, 3, dtype=F64, device=device))
        p = sum(q.numel() for q in f.parameters())
        v = torch.randn(p, dtype=F64, generator=torch.Generator().manual_seed(2)).to(device)
        so = snopt.second_order(f, x0, t, loss, rtol=1e-9, atol=1e-9)
        out[device] = (snopt.hvp(f, x0, t, loss, v, rtol=1e-9, atol=1e-9).cpu(), so.hess_params.cpu())
    assert _rel(out["cuda"][0], out["cpu"][0]) < 1e-7
    assert _rel(out["cuda"][1], out["cpu"][1]) < 1e-7


@cuda
def test_snopt_steps_agree_cpu_gpu() -> None:
    params = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(snopt.ODEBlock(Field(), method="rk4", options={"step_size": 0.1}),
                                    torch.nn.Linear(3, 4)).to(device=device, dtype=F64)
        opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.1), update_freq=2)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            x = torch.randn(8, 3, dtype=F64, generator=g).to(device)
            y = torch.randint(0, 4, (8,), generator=g).to(device)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
            opt.step()
        params[device] = torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()])
    assert _rel(params["cuda"], params["cpu"]) < 1e-9


@cuda
def test_experiment_runner_trains_alike_on_cpu_and_gpu() -> None:
    """`--device cuda` in `benchmarks.apps`: same initial model, same batches, same losses as on the CPU.

    Runs SGD, whose trajectory carries float32 round-off along without amplifying it. Adam's
    first steps are sign-like (m / sqrt(v)), so round-off in a near-zero gradient flips a whole
    lr-sized step: measured on an H100 after 6 steps, 1.8e-3 for Adam and 2.6e-4 for SNOpt (whose
    CPU/GPU agreement is checked in float64 above), so those are not compared here.
    """
    from benchmarks.apps import RunConfig
    from benchmarks.apps._runner import run

    hist = {}
    for device in ("cpu", "cuda"):
        cfg = RunConfig(task="digits", optimizer="sgd", seed=5, iterations=6, eval_every=3, device=device, threads=1)
        r = run(cfg)
        assert ("gpu" in r["machine"]) == (device == "cuda")
        hist[device] = torch.tensor(r["history"]["loss"] + r["evals"]["train_loss"], dtype=F64)
    cpu, gpu = hist["cpu"], hist["cuda"]
    assert len(cpu) == len(gpu) == 6 + 3
    # The first loss comes before any update: another batch or another initial model moves it by
    # ~5e-3 (the losses sit near log 10 whatever the batch), float32 round-off by ~1e-7.
    assert abs(float(gpu[0] - cpu[0])) < 1e-5, float(gpu[0] - cpu[0])
    gap = float((gpu - cpu).abs().max())
    assert gap < 1e-4, gap


@cuda
@pytest.mark.parametrize("case", ["cnf-wine-snopt", "digits-snopt-mc"])
def test_an_interrupted_cuda_run_resumes_to_the_uninterrupted_trajectory(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted GPU run resumes to the uninterrupted one, bit for bit.

    The CUDA random stream (the wine CNF's Hutchinson noise is drawn on the device) and device
    tensors go through the checkpoint file.

    cuDNN is asked for deterministic kernels (the digits model's convolutions); the test first checks
    that two uninterrupted runs agree, so a difference afterwards is the checkpoint's.
    """
    from benchmarks.apps import RunConfig, train
    from benchmarks.apps._cnf import CNFTask
    from benchmarks.apps._common import Task
    from benchmarks.apps._digits import ImageTask

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg, cls = {
        "cnf-wine-snopt": (RunConfig(task="cnf", dataset="wine", optimizer="snopt", iterations=12, batch_size=32,
                                     eval_every=4, snopt_freq=5, device="cuda", options={"hidden": 8}), CNFTask),
        "digits-snopt-mc": (RunConfig(task="digits", optimizer="snopt", iterations=12, batch_size=32, eval_every=4,
                                      snopt_freq=3, snopt_fisher="mc", device="cuda",
                                      options={"hidden": 4, "eval_train": 50}), ImageTask),
    }[case]
    reference, again = train(cfg), train(cfg)
    assert reference["history"]["loss"] == again["history"]["loss"]  # deterministic on this card
    drawn = [0]
    batch = cls.batch

    def counted(self: Task, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        drawn[0] += 1
        if drawn[0] == 7:  # after the checkpoint at iteration 4
            raise KeyboardInterrupt
        return batch(self, generator)

    monkeypatch.setattr(cls, "batch", counted)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, checkpoint=ckpt)
    torch.randn(1000, device="cuda")  # move the CUDA stream on, as another process's history would
    drawn[0] = -1000
    resumed = train(cfg, checkpoint=ckpt)
    assert resumed["resumed_at"] == [4] and drawn[0] == -1000 + 8
    for key in ("loss", "nfe_forward", "nfe_backward"):
        assert resumed["history"][key] == reference["history"][key], key
    assert resumed["evals"]["test_metric"] == reference["evals"]["test_metric"]
