"""The oneDNN Linear equals F.linear (float64 reference) in outputs and gradients, and falls back where it must."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusioninst.layers import OneDNNLinear as Linear, onednn_linear, onednn_linear_available, use_cpu_kernels

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="torch build without oneDNN")


def _uses_onednn(out: torch.Tensor) -> bool:
    fn = out.grad_fn
    if fn is not None and type(fn).__name__ == "ViewBackward0":  # (..., K) inputs are flattened to 2-D
        fn = fn.next_functions[0][0]
    return fn is not None and "OneDNNLinear" in type(fn).__name__


def _float64_reference(x, weight, bias, grad):
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    w64 = weight.detach().double().requires_grad_(weight.requires_grad)
    b64 = None if bias is None else bias.detach().double().requires_grad_(bias.requires_grad)
    out = F.linear(x64, w64, b64)
    out.backward(grad.double())
    return out, x64.grad, w64.grad, None if b64 is None else b64.grad


@needs_onednn
@pytest.mark.parametrize("in_shape,out_features,bias,transposed", [
    ((7, 13), 5, True, False),
    ((2, 3, 64), 33, True, False),
    ((50, 256), 1024, False, False),
    ((40, 9), 17, True, True),  # a strided (transposed) input
])
def test_outputs_and_gradients_match_float64(in_shape, out_features, bias, transposed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*in_shape, generator=g)
    if transposed:
        x = torch.randn(in_shape[::-1], generator=g).t()
    x.requires_grad_(True)
    layer = Linear(in_shape[-1], out_features, bias=bias)
    out = layer(x)
    assert _uses_onednn(out)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    ref, ref_x, ref_w, ref_b = _float64_reference(x, layer.weight, layer.bias, grad)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(x.grad.double(), ref_x, **tol)
    torch.testing.assert_close(layer.weight.grad.double(), ref_w, **tol)
    if bias:
        torch.testing.assert_close(layer.bias.grad.double(), ref_b, **tol)


@needs_onednn
def test_only_the_needed_gradients():
    layer = Linear(6, 4)
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None and layer.bias.grad is not None
    layer = Linear(6, 4)
    out = layer(torch.randn(3, 6))  # input without grad: weight gradients only
    out.sum().backward()
    assert _uses_onednn(out) and layer.weight.grad is not None


@pytest.mark.parametrize("case", ["float64", "autocast", "switched_off", "empty"])
def test_falls_back_to_f_linear(case):
    layer = Linear(8, 3)
    x = torch.randn(0 if case == "empty" else 5, 8, requires_grad=True)
    if case == "float64":
        layer, x = layer.double(), x.detach().double().requires_grad_()
    if case == "switched_off":
        use_cpu_kernels(nn.Sequential(layer), False)
        assert type(layer) is nn.Linear
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
    assert not _uses_onednn(out)
    assert torch.equal(out, expected)


def test_same_state_dict_as_nn_linear():
    plain = nn.Linear(5, 7)
    ours = Linear(5, 7)
    ours.load_state_dict(plain.state_dict())
    assert list(ours.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 5)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(onednn_linear(x.double(), plain.weight.double()), F.linear(x.double(), plain.weight.double()))


def test_config_switch_and_the_reference_uses_torch_linear():
    from detectron2.modeling import build_model

    from benchmarks import original_release as ref
    from conftest import tiny_cfg

    def kinds(model):
        return [type(m) for m in model.head.modules() if isinstance(m, nn.Linear) and not isinstance(
            m, nn.modules.linear.NonDynamicallyQuantizableLinear)]

    on = build_model(tiny_cfg())
    assert len(kinds(on)) > 20 and set(kinds(on)) == {Linear}
    assert set(kinds(build_model(tiny_cfg("MODEL.DiffusionInst.CPU_KERNELS", False)))) == {nn.Linear}
    with ref.torch_linear(on):
        assert set(kinds(on)) == {nn.Linear}
    assert set(kinds(on)) == {Linear}
