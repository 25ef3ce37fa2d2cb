"""Per-layer views for Kronecker factors: inputs ā, output cotangents g and the [W, b] gradient matrix.

For a layer h = W a + b evaluated at N "locations" (batch elements × spatial positions or
other leading dimensions), the gradient of a scalar through the layer is

    ∇[W, b] = Σ_locations g āᵀ = gᵀ ā   (ā = [a; 1] with a bias; rows of ā and g are locations)

where ``ā`` is the (N, d_in(+1)) matrix returned by `layer_inputs` and ``g`` the (N, d_out)
matrix returned by `layer_output_grads`. Row ``n`` of both matrices refers to the same
location, so the two can be fed straight into `snopt.curvature.accumulate_`.

Supported: `nn.Linear` (any number of leading dimensions, all flattened to locations)
and `nn.Conv2d` with ``groups=1`` (any stride, padding, padding mode and dilation,
batched or unbatched input; locations are ``batch × H_out × W_out`` in row-major order,
batch slowest). A layer "has a bias" when ``module.bias is not None``.
"""

from typing import TypeGuard

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

KronLayer = nn.Linear | nn.Conv2d
"""The layer types with Kronecker-factored curvature."""


def is_kron_layer(module: nn.Module) -> TypeGuard[KronLayer]:
    """Whether `module` is a layer these functions support (Linear, or Conv2d with ``groups=1``).

    Args:
        module: Any module.

    Returns:
        True for `nn.Linear` and for `nn.Conv2d` with ``groups == 1``.
    """
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _check_layer(module: nn.Module) -> KronLayer:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise NotImplementedError(
                f"Kronecker factors for grouped convolutions are not implemented; got an nn.Conv2d with "
                f"groups={module.groups}. Use groups=1 or exclude this layer from preconditioning.")
        return module
    if isinstance(module, nn.Linear):
        return module
    raise TypeError(f"Kronecker factors support nn.Linear and nn.Conv2d (groups=1); got {type(module).__name__}.")


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """Sizes (d_in, d_out) of a layer's Kronecker factors A (d_in × d_in) and G (d_out × d_out).

    Args:
        module: An `nn.Linear` or an `nn.Conv2d` with ``groups=1``.

    Returns:
        ``d_in`` = in_features (Linear) or in_channels·kh·kw (Conv2d), plus 1 with a bias;
        ``d_out`` = out_features or out_channels.

    Raises:
        TypeError: If `module` is neither Linear nor Conv2d.
        NotImplementedError: For a Conv2d with ``groups != 1``.
    """
    layer = _check_layer(module)
    d_out = layer.weight.shape[0]
    d_in = layer.weight.shape[1:].numel() + (layer.bias is not None)
    return d_in, d_out


def _conv_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Padding as (left, right, top, bottom), the order `F.pad` takes, as `nn.Conv2d` applies it."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        # "same" (stride 1): total d·(k−1) per dimension, the odd one out on the right/bottom,
        # as in `nn.Conv2d` and aten's `_convolution_mode`.
        (dh, dw), (kh, kw) = conv.dilation, conv.kernel_size
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def layer_inputs(module: nn.Module, a: Tensor) -> Tensor:
    """The matrix ā of layer inputs, one row per location, with a column of ones for a bias.

    Linear: ``a`` of shape (..., in_features) becomes (N, in_features(+1)), N = product of the
    leading dimensions. Conv2d: ``a`` of shape (B, C, H, W) or (C, H, W) is padded as the layer
    pads it and unfolded into patches (`torch.nn.functional.unfold`), giving (B·H_out·W_out,
    C·kh·kw(+1)); the column order matches ``weight.reshape(out_channels, -1)``.

    Args:
        module: An `nn.Linear` or an `nn.Conv2d` with ``groups=1``.
        a: The layer's input, as passed to ``module.forward``.

    Returns:
        ā, shape (N_locations, d_in), same dtype and device as ``a``.

    Raises:
        TypeError: If `module` is neither Linear nor Conv2d.
        NotImplementedError: For a Conv2d with ``groups != 1``.
        ValueError: If the shape of ``a`` does not fit the layer.
    """
    layer = _check_layer(module)
    if isinstance(layer, nn.Linear):
        if a.ndim < 1 or a.shape[-1] != layer.in_features:
            raise ValueError(f"`a` must have shape (..., {layer.in_features}) for this nn.Linear; "
                             f"got {tuple(a.shape)}.")
        rows = a.reshape(-1, layer.in_features)
    else:
        if a.ndim not in (3, 4) or a.shape[-3] != layer.in_channels:
            raise ValueError(f"`a` must have shape (B, {layer.in_channels}, H, W) or ({layer.in_channels}, H, W) "
                             f"for this nn.Conv2d; got {tuple(a.shape)}.")
        x = a if a.ndim == 4 else a.unsqueeze(0)
        pads = _conv_pads(layer)
        if layer.padding_mode == "zeros" and pads[0] == pads[1] and pads[2] == pads[3]:
            padding = (pads[2], pads[0])
        else:
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            x = F.pad(x, pads, mode=mode)
            padding = (0, 0)
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B·L, C·kh·kw), batch slowest
    if layer.bias is None:
        return rows
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def layer_output_grads(module: nn.Module, g: Tensor) -> Tensor:
    """The matrix of output cotangents g, one row per location, in the row order of `layer_inputs`.

    Args:
        module: An `nn.Linear` or an `nn.Conv2d` with ``groups=1``.
        g: Cotangent of the layer's output: (..., out_features) for Linear, (B, C_out, H_out,
            W_out) or (C_out, H_out, W_out) for Conv2d.

    Returns:
        g as (N_locations, d_out), same dtype and device.

    Raises:
        TypeError: If `module` is neither Linear nor Conv2d.
        NotImplementedError: For a Conv2d with ``groups != 1``.
        ValueError: If the shape of ``g`` does not fit the layer.
    """
    layer = _check_layer(module)
    if isinstance(layer, nn.Linear):
        if g.ndim < 1 or g.shape[-1] != layer.out_features:
            raise ValueError(f"`g` must have shape (..., {layer.out_features}) for this nn.Linear; "
                             f"got {tuple(g.shape)}.")
        return g.reshape(-1, layer.out_features)
    if g.ndim not in (3, 4) or g.shape[-3] != layer.out_channels:
        raise ValueError(f"`g` must have shape (B, {layer.out_channels}, H_out, W_out) or ({layer.out_channels}, "
                         f"H_out, W_out) for this nn.Conv2d; got {tuple(g.shape)}.")
    return g.movedim(-3, -1).reshape(-1, layer.out_channels)


def weight_grad_matrix(module: nn.Module) -> Tensor:
    """The gradient of [W, b] as one (d_out, d_in) matrix (Conv2d weights reshaped to (out, in·kh·kw)).

    Args:
        module: An `nn.Linear` or an `nn.Conv2d` with ``groups=1`` whose ``.grad`` fields are set.

    Returns:
        A new (d_out, d_in) tensor; the last column is the bias gradient when there is a bias.

    Raises:
        TypeError: If `module` is neither Linear nor Conv2d.
        NotImplementedError: For a Conv2d with ``groups != 1``.
        ValueError: If the weight's or the bias's ``.grad`` is None.
    """
    layer = _check_layer(module)
    if layer.weight.grad is None:
        raise ValueError(f"The weight of this {type(layer).__name__} has no gradient (`.grad` is None); "
                         "call backward() first.")
    w = layer.weight.grad.reshape(layer.weight.shape[0], -1)
    if layer.bias is None:
        return w.clone()
    if layer.bias.grad is None:
        raise ValueError(f"The bias of this {type(layer).__name__} has no gradient (`.grad` is None); "
                         "call backward() first, or build the layer with bias=False.")
    return torch.cat([w, layer.bias.grad.reshape(-1, 1)], dim=1)


def set_weight_grad_matrix(module: nn.Module, matrix: Tensor) -> None:
    """Write a (d_out, d_in) [W, b] matrix into ``weight.grad`` and ``bias.grad``: the inverse of `weight_grad_matrix`.

    Existing ``.grad`` tensors are overwritten in place (cast to their dtype); missing ones
    are created with the parameter's dtype and device.

    Args:
        module: An `nn.Linear` or an `nn.Conv2d` with ``groups=1``.
        matrix: The new gradient, shape (d_out, d_in) as in `layer_dims`.

    Raises:
        TypeError: If `module` is neither Linear nor Conv2d.
        NotImplementedError: For a Conv2d with ``groups != 1``.
        ValueError: If `matrix` has the wrong shape.
    """
    layer = _check_layer(module)
    d_in, d_out = layer_dims(layer)
    if matrix.shape != (d_out, d_in):
        raise ValueError(f"`matrix` must have shape ({d_out}, {d_in}) for this {type(layer).__name__}; "
                         f"got {tuple(matrix.shape)}.")
    k = layer.weight.shape[1:].numel()
    _write_grad(layer.weight, matrix[:, :k].reshape(layer.weight.shape))
    if layer.bias is not None:
        _write_grad(layer.bias, matrix[:, k])


def _write_grad(param: Tensor, value: Tensor) -> None:
    if param.grad is None:
        param.grad = torch.empty_like(param, requires_grad=False).copy_(value)
    else:
        param.grad.copy_(value)
