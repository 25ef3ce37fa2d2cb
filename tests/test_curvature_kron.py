"""Kronecker factors: in-place accumulation, "reduce" mode and dense blocks against explicit definitions."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from snopt.curvature import (
    KronFactors,
    ReduceAccumulator,
    TimeSharing,
    VecOrder,
    accumulate_,
    kron_block,
    layer_dims,
    layer_inputs,
    layer_output_grads,
    time_average,
    weight_grad_matrix,
)

torch.set_num_threads(1)
DT = torch.float64
seeds = st.integers(0, 2**31 - 1)
dims = st.integers(1, 4)


def _explicit_mean_outer(x: Tensor) -> Tensor:
    """(1/N) Σ_rows x_n x_nᵀ, written as a sum of outer products."""
    return sum((torch.outer(row, row) for row in x), torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)) / x.shape[0]


def _vec(x: Tensor, order: VecOrder) -> Tensor:
    return x.reshape(-1) if order is VecOrder.ROW else x.T.reshape(-1)


def test_time_sharing_values() -> None:
    assert TimeSharing("expand") is TimeSharing.EXPAND and TimeSharing("reduce") is TimeSharing.REDUCE
    with pytest.raises(ValueError, match="'sum' is not a valid TimeSharing"):
        TimeSharing("sum")


@given(d_in=dims, d_out=dims, rows=st.lists(st.integers(1, 5), min_size=1, max_size=4), tensor_weight=st.booleans(),
       seed=seeds)
def test_accumulate_matches_weighted_per_location_means(d_in: int, d_out: int, rows: list[int], tensor_weight: bool,
                                                        seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    f = KronFactors.zeros(d_in, d_out, dtype=DT)
    a_ref, g_ref, total = torch.zeros(d_in, d_in, dtype=DT), torch.zeros(d_out, d_out, dtype=DT), 0.0
    ptrs = (f.A.data_ptr(), f.G.data_ptr(), f.weight.data_ptr())
    for n in rows:
        a = torch.randn(n, d_in, dtype=DT, generator=gen)
        g = torch.randn(n + 1, d_out, dtype=DT, generator=gen)  # N_a and N_g need not agree
        w = float(torch.rand((), dtype=DT, generator=gen))
        assert accumulate_(f, a, g, torch.tensor(w, dtype=DT) if tensor_weight else w) is f
        a_ref += w * _explicit_mean_outer(a)
        g_ref += w * _explicit_mean_outer(g)
        total += w
    torch.testing.assert_close(f.A, a_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.G, g_ref, rtol=1e-12, atol=1e-12)
    assert float(f.weight) == pytest.approx(total, rel=1e-12)
    assert (f.steps, f.rows_a, f.rows_g) == (len(rows), sum(rows), sum(rows) + len(rows))
    assert (f.A.data_ptr(), f.G.data_ptr(), f.weight.data_ptr()) == ptrs  # in place, nothing reallocated
    avg = time_average(f)
    torch.testing.assert_close(avg.A * total, a_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(avg.G * total, g_ref, rtol=1e-12, atol=1e-12)
    f.reset_()
    assert float(f.A.abs().sum() + f.G.abs().sum() + f.weight) == 0.0 and (f.steps, f.rows_a, f.rows_g) == (0, 0, 0)


def test_accumulate_casts_inputs_to_the_factors_dtype() -> None:
    f = KronFactors.zeros(2, 3, dtype=DT)
    a, g = torch.randn(4, 2), torch.randn(4, 3)
    accumulate_(f, a, g, 0.5)
    assert f.A.dtype == DT
    torch.testing.assert_close(f.A, 0.5 * _explicit_mean_outer(a.double()))


@pytest.mark.parametrize("order", list(VecOrder), ids=str)
@given(d_in=dims, d_out=dims, seed=seeds)
def test_kron_block_one_datum_one_location_is_gradient_outer_product(order: VecOrder, d_in: int, d_out: int,
                                                                    seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, g = torch.randn(d_in, dtype=DT, generator=gen), torch.randn(d_out, dtype=DT, generator=gen)
    f = accumulate_(KronFactors.zeros(d_in, d_out, dtype=DT), a[None], g[None])
    v = _vec(torch.outer(g, a), order)  # the gradient matrix g āᵀ, flattened in `order`
    torch.testing.assert_close(kron_block(f, order=order), torch.outer(v, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kron_block(f, order=str(order)), kron_block(f, order=order))


def test_kron_block_orders_differ() -> None:
    # The two vec orders give different matrices for generic data (so the test above can tell them apart).
    gen = torch.Generator().manual_seed(1)
    f = accumulate_(KronFactors.zeros(2, 3, dtype=DT), torch.randn(1, 2, dtype=DT, generator=gen),
                    torch.randn(1, 3, dtype=DT, generator=gen))
    assert not torch.allclose(kron_block(f, order=VecOrder.ROW), kron_block(f, order=VecOrder.COLUMN))


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv2d"])
def test_layer_views_give_the_exact_block_for_one_datum_one_location(conv: bool) -> None:
    # With one datum at one location, A ⊗ G (row-major) is vec(∇[W, b]) vec(∇[W, b])ᵀ for the real layer.
    torch.manual_seed(0)
    module: nn.Linear | nn.Conv2d = nn.Conv2d(2, 3, (2, 3), dtype=DT) if conv else nn.Linear(4, 3, dtype=DT)
    x = torch.randn((1, 2, 2, 3) if conv else (1, 4), dtype=DT)
    y = module(x)
    r = torch.randn_like(y)
    (y * r).sum().backward()
    f = accumulate_(KronFactors.zeros(*layer_dims(module), dtype=DT), layer_inputs(module, x),
                    layer_output_grads(module, r))
    v = weight_grad_matrix(module).reshape(-1)
    torch.testing.assert_close(kron_block(f), torch.outer(v, v), rtol=1e-12, atol=1e-12)


def _grid(gen: torch.Generator, steps: int) -> Tensor:
    return torch.rand(steps, dtype=DT, generator=gen) + 0.1  # positive step lengths dt


@pytest.mark.parametrize("mode", list(TimeSharing), ids=str)
@given(d_in=dims, d_out=dims, steps=st.integers(1, 5), seed=seeds)
def test_constant_in_time_gives_the_exact_block(mode: TimeSharing, d_in: int, d_out: int, steps: int,
                                               seed: int) -> None:
    # ā and g constant on [t0, t1]: both modes give vec(∫ g āᵀ dt) vec(·)ᵀ for one datum, one location.
    gen = torch.Generator().manual_seed(seed)
    a, g, dt = torch.randn(1, d_in, dtype=DT, generator=gen), torch.randn(1, d_out, dtype=DT, generator=gen), \
        _grid(gen, steps)
    if mode is TimeSharing.EXPAND:
        f = KronFactors.zeros(d_in, d_out, dtype=DT)
        for w in dt:
            accumulate_(f, a, g, w)
    else:
        acc = ReduceAccumulator(d_in, d_out, dtype=DT)
        for w in dt:
            acc.add_(a, g, w)
        f = acc.finalize()
    v = (dt.sum() * torch.outer(g[0], a[0])).reshape(-1)
    torch.testing.assert_close(kron_block(f), torch.outer(v, v), rtol=1e-11, atol=1e-11)
    assert float(f.weight) == pytest.approx(float(dt.sum()), rel=1e-12)


@given(d_in=dims, d_out=dims, steps=st.integers(1, 5), seed=seeds)
def test_reduce_is_exact_when_only_g_varies_in_time(d_in: int, d_out: int, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, dt = torch.randn(1, d_in, dtype=DT, generator=gen), _grid(gen, steps)
    gs = torch.randn(steps, 1, d_out, dtype=DT, generator=gen)
    acc = ReduceAccumulator(d_in, d_out, dtype=DT)
    for w, g in zip(dt, gs, strict=True):
        acc.add_(a, g, float(w))
    grad = sum((float(w) * torch.outer(g[0], a[0]) for w, g in zip(dt, gs, strict=True)),
               torch.zeros(d_out, d_in, dtype=DT))  # the per-sample gradient ∫ g āᵀ dt
    v = grad.reshape(-1)
    torch.testing.assert_close(kron_block(acc.finalize()), torch.outer(v, v), rtol=1e-11, atol=1e-11)


@given(batch=st.integers(1, 3), locs=st.one_of(st.none(), st.integers(1, 3)), d_in=dims, d_out=dims,
       steps=st.integers(1, 4), tensor_weight=st.booleans(), seed=seeds)
def test_reduce_matches_explicit_definition(batch: int, locs: int | None, d_in: int, d_out: int, steps: int,
                                            tensor_weight: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch,) if locs is None else (batch, locs)
    a_t = torch.randn(steps, *shape, d_in, dtype=DT, generator=gen)
    g_t = torch.randn(steps, *shape, d_out, dtype=DT, generator=gen)
    dt = _grid(gen, steps)
    acc = ReduceAccumulator(d_in, d_out, dtype=DT)
    for k in range(steps):
        acc.add_(a_t[k].float(), g_t[k], dt[k] if tensor_weight else float(dt[k]))  # float32 ā is cast up
    f = acc.finalize()
    # Explicit definition, keeping every step: per (sample, location) time-average of ā, time-integral of g.
    a_mean = (dt.reshape(-1, *[1] * (a_t.ndim - 1)) * a_t.float().double()).sum(0) / dt.sum()
    g_int = (dt.reshape(-1, *[1] * (g_t.ndim - 1)) * g_t).sum(0)
    torch.testing.assert_close(f.A, _explicit_mean_outer(a_mean.reshape(-1, d_in)), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(f.G, _explicit_mean_outer(g_int.reshape(-1, d_out)), rtol=1e-11, atol=1e-11)
    n = batch * (locs or 1)
    assert (f.steps, f.rows_a, f.rows_g) == (steps, n, n)
    acc.reset_()
    with pytest.raises(ValueError, match="Nothing with positive weight has been added"):
        acc.finalize()


def test_reduce_accumulator_keeps_constant_memory() -> None:
    acc = ReduceAccumulator(3, 2, dtype=DT)
    acc.add_(torch.randn(4, 5, 3, dtype=DT), torch.randn(4, 5, 2, dtype=DT), 0.1)
    sums = [acc._sum_a, acc._sum_g]
    ptrs = [s.data_ptr() for s in sums if s is not None]
    for _ in range(5):
        acc.add_(torch.randn(4, 5, 3, dtype=DT), torch.randn(4, 5, 2, dtype=DT), 0.1)
    assert [s.data_ptr() for s in (acc._sum_a, acc._sum_g) if s is not None] == ptrs


ERROR_CASES = [
    ("zero size", lambda: KronFactors.zeros(0, 2), r"`d_in` and `d_out` must be positive; got d_in=0, d_out=2"),
    ("a_bar width", lambda: accumulate_(KronFactors.zeros(2, 3), torch.zeros(4, 3), torch.zeros(4, 3)),
     r"`a_bar` must have shape \(N, 2\) to match A of size 2; got \(4, 3\)"),
    ("g ndim", lambda: accumulate_(KronFactors.zeros(2, 3), torch.zeros(4, 2), torch.zeros(3)),
     r"`g` must have shape \(N, 3\) to match G of size 3; got \(3,\)"),
    ("no rows", lambda: accumulate_(KronFactors.zeros(2, 3), torch.zeros(0, 2), torch.zeros(1, 3)),
     r"`a_bar` has no rows"),
    ("negative weight", lambda: accumulate_(KronFactors.zeros(2, 3), torch.zeros(1, 2), torch.zeros(1, 3), -0.1),
     r"`weight` must be a non-negative quadrature weight; got -0.1"),
    ("vector weight", lambda: accumulate_(KronFactors.zeros(2, 3), torch.zeros(1, 2), torch.zeros(1, 3),
                                          torch.ones(2)),
     r"`weight` must be a number or a one-element tensor; got shape \(2,\)"),
    ("zero weight", lambda: time_average(KronFactors.zeros(2, 3)), r"`factors` have zero total weight"),
    ("bad order", lambda: kron_block(KronFactors.zeros(2, 3), order="diagonal"), r"'diagonal' is not a valid VecOrder"),
    ("reduce shapes", lambda: ReduceAccumulator(2, 3).add_(torch.zeros(4, 2), torch.zeros(5, 3)),
     r"`a_bar_per_sample` and `g_per_sample` must have shapes \(B, L, 2\) and \(B, L, 3\)"),
    ("reduce change", lambda: _add_twice((4, 1, 2), (3, 1, 2)),
     r"Shapes must stay fixed between resets: the running sums have shape \(B, L\) = \(4, 1\); got \(3, 1\)"),
    ("reduce empty", lambda: ReduceAccumulator(2, 3).finalize(), r"Nothing with positive weight has been added"),
]


def _add_twice(first: tuple[int, ...], second: tuple[int, ...]) -> None:
    acc = ReduceAccumulator(2, 3)
    acc.add_(torch.zeros(first), torch.zeros(*first[:2], 3))
    acc.add_(torch.zeros(second), torch.zeros(*second[:2], 3))


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors(call: object, match: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=match):
        call()
