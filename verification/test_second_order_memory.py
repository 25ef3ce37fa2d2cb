"""Claim: `snopt.hvp` runs in memory independent of the number of solver steps; backprop through the solver does not.

Each product runs in a fresh interpreter (`verification._second_order_refs.peak_rss_mb`) and
reports its peak RSS (Linux ``VmHWM``; ``ru_maxrss`` would include pytest's own RSS, which the
child inherits across fork + exec, and make the flatness check vacuous): MLP 16 → 64 → 16,
batch 64, p = 2,128, float64, rk4 with 10 and 1000 steps. The table for 10 / 100 / 1000 steps is benchmarks/results/
second_order_memory_cpu.md (``python benchmarks/bench_second_order.py``).

Measured on the development machine: hvp 375 → 375 MB, ggn_vp 368 → 368 MB; reverse-over-reverse
(double backward through plain torchdiffeq.odeint) 329 → ~1,500 MB (1,479–1,618 over runs).
The baseline (interpreter + torch + the problem) is ~300 MB, so "within 10%" allows ~35 MB of
allocator drift, while a product that stored even 40 KB per step would grow by 40 MB over
1000 steps.
"""

import pytest

from verification._second_order_refs import peak_rss_mb

pytestmark = pytest.mark.slow  # ~40 s: four interpreters, two of them 1000-step products


@pytest.mark.parametrize("mode", ["hvp", "ggn_vp"])
def test_snopt_products_flat_in_steps(mode: str) -> None:
    few, many = peak_rss_mb(mode, 10), peak_rss_mb(mode, 1000)
    assert abs(many["peak_rss_mb"] - few["peak_rss_mb"]) <= 0.10 * few["peak_rss_mb"], (few, many)
    # Same product, finer grid: the results agree to the O(h⁴) discretisation error.
    assert abs(many["norm"] - few["norm"]) <= 1e-6 * abs(many["norm"])


def test_reverse_over_reverse_grows_with_steps() -> None:
    """The control: the same hvp by double backward through the solver stores every step."""
    few, many = peak_rss_mb("reverse_over_reverse", 10), peak_rss_mb("reverse_over_reverse", 1000)
    # ~1.2 MB per rk4 step here (4 stages × saved activations and their double-backward graph).
    assert many["peak_rss_mb"] - few["peak_rss_mb"] >= 500, (few, many)
    assert many["peak_rss_mb"] >= 2.0 * few["peak_rss_mb"], (few, many)
