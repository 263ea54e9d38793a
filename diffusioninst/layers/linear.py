"""nn.Linear whose float32 CPU products run oneDNN's inner product instead of torch's default (MKL) sgemm.

The decoder's large layers (the dynamic layer 256 -> 32768 and the interaction output 12544 -> 256, six stages) are
most of DiffusionInst's CPU time. On CPUs where MKL's sgemm does not use AVX-512 (on the AMD EPYC we measure on:
55 GMAC/s on one core against 123 for oneDNN), oneDNN's float32 kernels (``torch.ops.mkldnn._linear_pointwise``,
the op Inductor uses on CPU) are faster: for the dynamic layer at 200 rows, 21 -> 8 ms forward and 17 -> 9 ms for
the input gradient. Forward, input gradient and weight gradient all go through it; the arithmetic is float32 with
float32 accumulation, only summed in another order. oneDNN builds a kernel per shape, so this suits layers whose
shapes repeat. Other devices and dtypes, autocast, and torch builds without the op (checked once: the op is
private) use ``F.linear`` unchanged. Opt-in through ``MODEL.DiffusionInst.CPU_KERNELS``.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OneDNNLinear", "onednn_linear", "onednn_linear_available"]


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN and its dense-input inner-product op (checked once per process)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _inner_product(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x (M, K) @ weight (N, K)^T + bias (N,) by oneDNN; x and weight may be strided views."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _inner_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _inner_product(grad, weight.t(), None)  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            grad_w = _inner_product(grad.t(), x.t(), None)  # (N, M) @ (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def _eligible(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )


def onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for x (..., K), by oneDNN where eligible (float32 on CPU, no autocast)."""
    if not (_eligible(x, weight) and onednn_linear_available()):
        return F.linear(x, weight, bias)
    if x.dim() == 2:
        return _OneDNNLinear.apply(x, weight, bias)
    out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(nn.Linear):
    """nn.Linear (same parameters and state_dict) computing through :func:`onednn_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return onednn_linear(x, self.weight, self.bias)
