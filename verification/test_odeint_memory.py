"""Claim: `snopt.odeint` needs O(1) memory in the number of solver steps.

Two measurements (REFERENCE.md §3):

(a) Bytes packed by `torch.autograd.graph.saved_tensors_hooks` — everything autograd keeps
    for backward — counted by `snopt.testing.saved_tensor_bytes` / `assert_memory_flat`: what the
    forward pass leaves for backward and the peak of what is alive at once during forward +
    backward, deterministic on every machine.
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
from typing import Any

import pytest
import torch
import torchdiffeq
from torch import Tensor, nn

import snopt
from snopt.testing import assert_memory_flat, saved_tensor_bytes

DIM, WIDTH, BATCH = 8, 64, 32
FEW, MANY = 10, 1000


class Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, WIDTH), nn.Tanh(), nn.Linear(WIDTH, DIM))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


Solver = Callable[..., Any]


def loss_with_steps(solver: Solver) -> tuple[Callable[[int], Tensor], int]:
    """(steps ↦ loss through `solver` with that many rk4 steps, bytes of y0, t, the outputs and θ)."""
    torch.manual_seed(0)
    field = Field()
    y0 = torch.randn(BATCH, DIM, requires_grad=True)
    t = torch.tensor([0.0, 1.0])

    def make_loss(steps: int) -> Tensor:
        ys = solver(field, y0, t, method="rk4", options={"step_size": 1.0 / steps})
        out: Tensor = ys[-1].pow(2).sum()
        return out

    outputs = 2 * y0.numel() * y0.element_size()  # ys: (len(t), *y0.shape)
    inputs = sum(x.numel() * x.element_size() for x in (y0, t, *field.parameters())) + outputs
    return make_loss, inputs


def test_snopt_saved_tensors_do_not_grow_with_steps() -> None:
    make_loss, inputs = loss_with_steps(snopt.odeint)
    # Retained bytes after the forward and the peak during backward (one vector-Jacobian
    # product's graph alive at a time) within 10% from 10 to 1000 steps.
    found = assert_memory_flat(make_loss, steps=(FEW, MANY), rtol=0.1)
    # Only the outputs at the requested times (and t, the parameters) are kept: at most
    # the size of y0, t, ys and θ together, whatever the number of steps.
    assert all(0 < m.retained <= inputs for m in found.values()), (found, inputs)


def test_backprop_saved_tensors_grow_linearly_with_steps() -> None:
    # The same meter on plain backprop through torchdiffeq: every stage of every step is
    # kept, so 100× the steps gives ≈ 100× the bytes (≥ 50 allows a fixed overhead), and the
    # flatness check fails, naming the growth.
    make_loss, _ = loss_with_steps(torchdiffeq.odeint)
    few, many = saved_tensor_bytes(lambda: make_loss(FEW)), saved_tensor_bytes(lambda: make_loss(MANY))
    assert many.retained / few.retained >= 50, (few, many)
    with pytest.raises(AssertionError, match="retained saved bytes grow with the number of steps"):
        assert_memory_flat(make_loss, steps=(FEW, MANY))


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
