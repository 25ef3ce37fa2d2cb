"""Layer views ā, g and the [W, b] gradient matrix against autograd (Linear, Conv2d)."""

from typing import Literal

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor, nn

from snopt.curvature import (
    is_kron_layer,
    layer_dims,
    layer_inputs,
    layer_output_grads,
    set_weight_grad_matrix,
    weight_grad_matrix,
)

torch.set_num_threads(1)
DT = torch.float64
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


def _param_matrix(module: nn.Linear | nn.Conv2d) -> Tensor:
    """[W, b] as a (d_out, d_in) matrix, built independently of the code under test."""
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    if module.bias is None:
        return w
    return torch.cat([w, module.bias.detach()[:, None]], dim=1)


def _check_against_autograd(module: nn.Linear | nn.Conv2d, a: Tensor, gen: torch.Generator) -> None:
    y = module(a)
    r = torch.randn(y.shape, dtype=DT, generator=gen)
    module.zero_grad(set_to_none=True)
    (y * r).sum().backward()
    a_bar, g = layer_inputs(module, a), layer_output_grads(module, r)
    d_in, d_out = layer_dims(module)
    assert a_bar.shape[1] == d_in and g.shape[1] == d_out and a_bar.shape[0] == g.shape[0]
    # Gradient property: ∇[W, b] = gᵀ ā, summed over all locations.
    torch.testing.assert_close(weight_grad_matrix(module), g.T @ a_bar, rtol=1e-10, atol=1e-10)
    # Forward property (same row order, same column order): the layer is ā [W, b]ᵀ location by location.
    torch.testing.assert_close(a_bar @ _param_matrix(module).T, layer_output_grads(module, y.detach()),
                               rtol=1e-10, atol=1e-10)


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[nn.Conv2d, tuple[int, ...], int]:
    c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding: str | tuple[int, int] = draw(st.one_of(st.sampled_from(["same", "valid"]),
                                                     st.tuples(st.integers(0, 2), st.integers(0, 2))))
    stride = (1, 1) if padding == "same" else draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    mode: PaddingMode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    h = draw(st.integers(dh * (kh - 1) + 1, dh * (kh - 1) + 4))
    w = draw(st.integers(dw * (kw - 1) + 1, dw * (kw - 1) + 4))
    if isinstance(padding, tuple):
        pads = padding
    elif padding == "same":
        pads = (-(-dh * (kh - 1) // 2), -(-dw * (kw - 1) // 2))
    else:
        pads = (0, 0)
    if mode != "zeros":
        assume(pads[0] < h and pads[1] < w)  # reflect/circular padding needs pad < size
    batch = draw(st.one_of(st.none(), st.integers(1, 3)))
    shape = (c_in, h, w) if batch is None else (batch, c_in, h, w)
    conv = nn.Conv2d(c_in, c_out, (kh, kw), stride=stride, padding=padding, dilation=(dh, dw),
                     bias=draw(st.booleans()), padding_mode=mode, dtype=DT)
    return conv, shape, draw(st.integers(0, 2**31 - 1))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@given(conv_cases())
def test_conv2d_grad_matrix_is_gT_abar(case: tuple[nn.Conv2d, tuple[int, ...], int]) -> None:
    conv, shape, seed = case
    gen = torch.Generator().manual_seed(seed)
    _check_against_autograd(conv, torch.randn(shape, dtype=DT, generator=gen), gen)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(("kernel", "dilation"), [((2, 4), (1, 1)), ((4, 2), (3, 1)), ((2, 3), (1, 2))])
def test_conv2d_same_padding_with_odd_total_padding(mode: PaddingMode, kernel: tuple[int, int],
                                                     dilation: tuple[int, int]) -> None:
    # d·(k−1) odd in some dimension: "same" pads one more on the right/bottom than on the left/top.
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, padding="same", dilation=dilation, padding_mode=mode, dtype=DT)
    _check_against_autograd(conv, torch.randn(2, 2, 6, 7, dtype=DT, generator=gen), gen)


@given(d_in=st.integers(1, 5), d_out=st.integers(1, 5), lead=st.lists(st.integers(1, 3), max_size=3),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_linear_grad_matrix_is_gT_abar(d_in: int, d_out: int, lead: list[int], bias: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias, dtype=DT)
    _check_against_autograd(lin, torch.randn(*lead, d_in, dtype=DT, generator=gen), gen)


def test_conv2d_location_order_is_batch_then_row_major() -> None:
    conv = nn.Conv2d(1, 1, 1, bias=False, dtype=DT)
    a = torch.arange(2 * 2 * 3, dtype=DT).reshape(2, 1, 2, 3)
    assert layer_inputs(conv, a)[:, 0].tolist() == list(range(12))
    assert layer_output_grads(conv, a)[:, 0].tolist() == list(range(12))


@given(conv=st.booleans(), bias=st.booleans(), existing=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_set_weight_grad_matrix_inverts_weight_grad_matrix(conv: bool, bias: bool, existing: bool,
                                                             seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    module: nn.Linear | nn.Conv2d = (nn.Conv2d(2, 3, (2, 3), bias=bias, dtype=torch.float32) if conv
                                     else nn.Linear(4, 3, bias=bias, dtype=torch.float32))
    if existing:
        for p in module.parameters():
            p.grad = torch.full_like(p, 7.0)
    d_in, d_out = layer_dims(module)
    m = torch.randn(d_out, d_in, dtype=DT, generator=gen)
    set_weight_grad_matrix(module, m)
    for p in module.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype
    torch.testing.assert_close(weight_grad_matrix(module), m.float())
    k = module.weight[0].numel()
    torch.testing.assert_close(module.weight.grad, m[:, :k].float().reshape(module.weight.shape))


def test_weight_grad_matrix_is_a_copy() -> None:
    lin = nn.Linear(2, 2, bias=False, dtype=DT)
    lin.weight.grad = torch.ones_like(lin.weight)
    weight_grad_matrix(lin).zero_()
    assert bool((lin.weight.grad == 1).all())


def test_is_kron_layer() -> None:
    assert is_kron_layer(nn.Linear(2, 3))
    assert is_kron_layer(nn.Conv2d(2, 3, 1))
    assert not is_kron_layer(nn.Conv2d(2, 4, 1, groups=2))
    assert not is_kron_layer(nn.Conv1d(2, 3, 1))
    assert layer_dims(nn.Conv2d(2, 3, (2, 5))) == (2 * 2 * 5 + 1, 3)
    assert layer_dims(nn.Linear(4, 3, bias=False)) == (4, 3)


def _no_grad_linear() -> nn.Linear:
    return nn.Linear(2, 3)


def _bias_without_grad() -> nn.Linear:
    lin = nn.Linear(2, 3)
    lin.weight.grad = torch.zeros_like(lin.weight)
    return lin


ERROR_CASES = [
    ("grouped conv", lambda: layer_inputs(nn.Conv2d(2, 4, 1, groups=2), torch.zeros(1, 2, 3, 3)),
     NotImplementedError, r"grouped convolutions are not implemented; got an nn.Conv2d with groups=2"),
    ("conv1d", lambda: layer_dims(nn.Conv1d(2, 3, 1)), TypeError,
     r"support nn.Linear and nn.Conv2d \(groups=1\); got Conv1d"),
    ("linear input", lambda: layer_inputs(nn.Linear(2, 3), torch.zeros(4, 3)), ValueError,
     r"`a` must have shape \(\.\.\., 2\) for this nn.Linear; got \(4, 3\)"),
    ("linear grad", lambda: layer_output_grads(nn.Linear(2, 3), torch.zeros(4, 2)), ValueError,
     r"`g` must have shape \(\.\.\., 3\) for this nn.Linear; got \(4, 2\)"),
    ("conv input", lambda: layer_inputs(nn.Conv2d(2, 3, 1), torch.zeros(1, 3, 4, 4)), ValueError,
     r"`a` must have shape \(B, 2, H, W\) or \(2, H, W\) for this nn.Conv2d; got \(1, 3, 4, 4\)"),
    ("conv grad", lambda: layer_output_grads(nn.Conv2d(2, 3, 1), torch.zeros(4, 4)), ValueError,
     r"`g` must have shape \(B, 3, H_out, W_out\)"),
    ("no grad", lambda: weight_grad_matrix(_no_grad_linear()), ValueError,
     r"The weight of this Linear has no gradient \(`.grad` is None\); call backward\(\) first."),
    ("no bias grad", lambda: weight_grad_matrix(_bias_without_grad()), ValueError,
     r"The bias of this Linear has no gradient"),
    ("set shape", lambda: set_weight_grad_matrix(nn.Linear(2, 3), torch.zeros(3, 2)), ValueError,
     r"`matrix` must have shape \(3, 3\) for this Linear; got \(3, 2\)"),
]


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors(call: object, error: type[Exception], match: str) -> None:
    assert callable(call)
    with pytest.raises(error, match=match):
        call()
