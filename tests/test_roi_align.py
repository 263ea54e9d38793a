"""The sparse-matrix RoIAlign backward equals torchvision's gradient; the forward is torchvision's own."""
from __future__ import annotations

import warnings

import pytest
import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from torchvision.ops import roi_align

from diffusioninst.modeling.roi_align import ROIAlignFastBackward, roi_align_fast_backward, use_fast_roi_align_backward


def _rois(num: int, batch: int, extent: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * extent * 1.2 - 0.1 * extent
    wh = torch.rand(num, 2, generator=g) * extent * 0.5
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([-40.0, -40.0, -5.0, -5.0])  # entirely outside: zero gradient
    boxes[1] = torch.tensor([extent - 10, extent - 10, extent + 30, extent + 30])  # crosses the bottom-right edge
    boxes[2] = torch.tensor([10.0, 10.0, 10.0, 30.0])  # zero width
    return torch.cat([torch.randint(0, batch, (num, 1), generator=g).float(), boxes], 1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio,output_size,scale", [(2, (7, 7), 0.25), (1, (4, 6), 0.125), (3, (2, 2), 1.0)])
def test_gradient_equals_torchvision(aligned, sampling_ratio, output_size, scale):
    torch.manual_seed(0)
    features = torch.randn(3, 5, 17, 23, dtype=torch.float64, requires_grad=True)
    rois = _rois(40, 3, 23 / scale).double()
    grad_out = torch.randn(40, 5, *output_size, dtype=torch.float64)
    expected_out = roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
    (expected,) = torch.autograd.grad(expected_out, features, grad_out)
    out = roi_align_fast_backward(features, rois, output_size, scale, sampling_ratio, aligned)
    (got,) = torch.autograd.grad(out, features, grad_out)
    assert torch.equal(out, expected_out)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_pooler_swap_keeps_forward_and_gradient():
    torch.manual_seed(0)
    pooler = ROIPooler((7, 7), (1 / 4, 1 / 8), sampling_ratio=2, pooler_type="ROIAlignV2")
    fast = ROIPooler((7, 7), (1 / 4, 1 / 8), sampling_ratio=2, pooler_type="ROIAlignV2")
    use_fast_roi_align_backward(fast)
    assert all(isinstance(m, ROIAlignFastBackward) for m in fast.level_poolers)
    feats = [torch.randn(2, 8, 32, 40, requires_grad=True), torch.randn(2, 8, 16, 20, requires_grad=True)]
    boxes = [Boxes(_rois(30, 1, 128, seed=s)[:, 1:].clamp(0, 128)) for s in (1, 2)]
    grad = torch.randn(60, 8, 7, 7)
    ref = pooler(feats, boxes)
    ref_grads = torch.autograd.grad(ref, feats, grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sparse-beta warning is silenced
        out = fast(feats, boxes)
        grads = torch.autograd.grad(out, feats, grad)
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_needs_fixed_sampling_ratio():
    with pytest.raises(ValueError, match="POOLER_SAMPLING_RATIO"):
        roi_align_fast_backward(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), (2, 2), 1.0, 0, True)
