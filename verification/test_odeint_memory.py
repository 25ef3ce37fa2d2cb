"""Claim: `snopt.odeint` needs O(1) memory in the number of solver steps.

Two measurements (REFERENCE.md §3):

(a) Bytes packed by `torch.autograd.graph.saved_tensors_hooks` — everything autograd keeps
    for backward. The pack hook stores ``t.detach()`` (storing ``t`` itself would keep the
    graph alive and make any adjoint look O(N)) and counts ``numel · element_size``; an
    object's finaliser subtracts it again, so we get both what the forward pass leaves for
    backward and the peak of what is alive at once during forward + backward.
(b) Peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) of a fresh subprocess doing one
    forward + backward: covers what the hooks cannot see (solver internals, torch.func).

Both compare 10 vs 1000 RK4 steps of the same problem. Plain backprop through
`torchdiffeq.odeint` is measured alongside, to show the measurement does see O(N) growth.
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import pytest
import torch
import torchdiffeq
from torch import Tensor, nn

import snopt

DIM, WIDTH, BATCH = 8, 64, 32
FEW, MANY = 10, 1000




class SavedTensorMeter:
    """Counts the bytes autograd saves for backward, via `saved_tensors_hooks`.

    Attributes:
        live: Bytes currently held by saved tensors packed inside the context.
        peak: Maximum of `live`.
        total: All bytes ever packed.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.total = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor) -> "_Packed":
        return _Packed(t, self)

    @staticmethod
    def _unpack(p: "_Packed") -> Tensor:
        return p.tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._ctx.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._ctx.__exit__(et, ev, tb)


class _Packed:
    """One saved tensor: stored detached, its bytes counted while it is alive."""

    def __init__(self, t: Tensor, meter: SavedTensorMeter) -> None:
        self.tensor = t.detach()
        self.nbytes = t.numel() * t.element_size()
        self.meter = meter
        meter.total += self.nbytes
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, WIDTH), nn.Tanh(), nn.Linear(WIDTH, DIM))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


Solver = Callable[..., Any]


def saved_bytes(solver: Solver, steps: int) -> tuple[int, int, int]:
    """(bytes left for backward by the forward pass, peak live bytes, bytes the inputs occupy)."""
    torch.manual_seed(0)
    field = Field()
    y0 = torch.randn(BATCH, DIM, requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    with SavedTensorMeter() as meter:
        ys = solver(field, y0, t, method="rk4", options={"step_size": 1.0 / steps})
        retained = meter.live
        ys[-1].pow(2).sum().backward()
    assert y0.grad is not None and bool(torch.isfinite(y0.grad).all())
    assert meter.live == 0, "saved tensors outlived backward (the meter would be wrong)"
    inputs = sum(x.numel() * x.element_size() for x in (y0, t, ys, *field.parameters()))
    return retained, meter.peak, inputs


def test_snopt_saved_tensors_do_not_grow_with_steps() -> None:
    few, peak_few, inputs = saved_bytes(snopt.odeint, FEW)
    many, peak_many, _ = saved_bytes(snopt.odeint, MANY)
    # Only the outputs at the requested times (and t, the parameters) are kept: at most
    # the size of y0, t, ys and θ together, whatever the number of steps.
    assert 0 < few <= inputs and 0 < many <= inputs
    assert many / few <= 1.1, (few, many)
    # During backward, one vector-Jacobian product's graph is alive at a time.
    assert peak_many / peak_few <= 1.1, (peak_few, peak_many)


def test_backprop_saved_tensors_grow_linearly_with_steps() -> None:
    # The same meter on plain backprop through torchdiffeq: every stage of every step is
    # kept, so 100× the steps gives ≈ 100× the bytes (≥ 50 allows a fixed overhead).
    few, _, _ = saved_bytes(torchdiffeq.odeint, FEW)
    many, _, _ = saved_bytes(torchdiffeq.odeint, MANY)
    assert many / few >= 50, (few, many)


# ----------------------------------------------------------------------------------------------
# (b) peak RSS of a fresh process
# ----------------------------------------------------------------------------------------------

RSS_SCRIPT = """
import json, os, resource, sys
import torch, torchdiffeq, snopt
from torch import nn
torch.set_num_threads(1)
solver, steps, width, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def vm_hwm():  # the high-water mark of this address space (Linux), to validate maxrss
    if not os.path.exists("/proc/self/status"):
        return None
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
torch.manual_seed(0)
class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 8))
    def forward(self, t, x):
        return self.net(x)
fn = {"snopt": snopt.odeint, "torchdiffeq": torchdiffeq.odeint}[solver]
f, t = Field(), torch.tensor([0.0, 1.0])
y0 = torch.randn(batch, 8, requires_grad=True)
# Warm-up (2 steps): lazy allocations and kernel caches before the baseline is read.
fn(f, y0, t, method="rk4", options={"step_size": 0.5})[-1].pow(2).sum().backward()
base = maxrss()
fn(f, y0, t, method="rk4", options={"step_size": 1.0 / steps})[-1].pow(2).sum().backward()
peak = maxrss()
print(json.dumps({"base_kib": base, "peak_kib": peak, "vm_hwm_kib": vm_hwm()}))
"""
RSS_WIDTH, RSS_BATCH = 64, 64
# Allocator noise: glibc arenas and the mmap threshold move RSS by ~1–2 MiB between runs of
# the same flat workload (measured increments 0.8–2 MiB); plain backprop at 1000 steps adds
# ~100 MiB at this size, so 8 MiB separates the two by an order of magnitude.
RSS_SLACK_KIB = 8 * 1024
# Linux keeps ru_maxrss across execve: a child exec'd straight from pytest reports pytest's
# own high-water mark (hundreds of MiB), hiding everything below it. So the child is forked
# by a small shell (`; exit $?` stops the shell from exec'ing it), and the child checks its
# ru_maxrss against VmHWM, which belongs to its own address space.
LAUNCH = '"$0" -c "$1" "$2" "$3" "$4" "$5"; exit $?'


def _launch(solver: str, steps: int) -> "subprocess.Popen[str]":
    return subprocess.Popen(
        ["/bin/sh", "-c", LAUNCH, sys.executable, RSS_SCRIPT, solver, str(steps), str(RSS_WIDTH), str(RSS_BATCH)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _collect(proc: "subprocess.Popen[str]") -> tuple[int, int]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    rec = json.loads(out.strip().splitlines()[-1])
    base, peak, hwm = int(rec["base_kib"]), int(rec["peak_kib"]), rec["vm_hwm_kib"]
    if hwm is not None:
        assert abs(peak - int(hwm)) <= RSS_SLACK_KIB, f"ru_maxrss {peak} KiB is not this process's own ({hwm} KiB)"
    return base, peak


def peak_rss_kib(solver: str, steps: Sequence[int]) -> list[tuple[int, int]]:
    """Per step count: (RSS high-water mark before the measured solve, after it) in KiB.

    One fresh interpreter per step count, run concurrently (each measures only itself).
    """
    procs = [_launch(solver, n) for n in steps]
    return [_collect(p) for p in procs]


def rss_is_flat(few: tuple[int, int], many: tuple[int, int]) -> bool:
    """Peak within 10% and growth over the pre-solve baseline within 10% + allocator slack."""
    (base_few, peak_few), (base_many, peak_many) = few, many
    grow_few, grow_many = peak_few - base_few, peak_many - base_many
    return peak_many <= 1.1 * peak_few and grow_many <= 1.1 * grow_few + RSS_SLACK_KIB


def test_snopt_peak_rss_flat_in_steps() -> None:
    few, many = peak_rss_kib("snopt", (FEW, MANY))
    assert rss_is_flat(few, many), f"peak RSS (base, peak) KiB at {FEW} steps {few}, at {MANY} steps {many}"


@pytest.mark.slow
def test_backprop_peak_rss_grows_with_steps() -> None:
    # The same check fails on plain backprop through torchdiffeq (its graph grows with N).
    few, many = peak_rss_kib("torchdiffeq", (FEW, MANY))
    assert not rss_is_flat(few, many), (few, many)
    assert (many[1] - many[0]) >= 10 * RSS_SLACK_KIB, (few, many)
