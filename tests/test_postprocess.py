"""Post-processing: masks computed inside their boxes equal the full-image computation; top-k and NMS helpers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusioninst.modeling.dynamic_mask_head import DynamicMaskWindows, dynamic_mask_logits
from diffusioninst.modeling.mask_branch import aligned_bilinear
from diffusioninst.modeling.postprocess import masks_to_image, nms_and_cap, select_topk


def full_image_masks(probs, input_size, output_size, boxes, threshold=0.5):
    """The straightforward computation: every mask upsampled x4, cropped, resized to the image, thresholded, boxed.
    Returns the binary masks and the probabilities they were thresholded from."""
    full = aligned_bilinear(probs[:, None], 4)[:, :, : input_size[0], : input_size[1]]
    full = F.interpolate(full, size=output_size, mode="bilinear", align_corners=False)[:, 0]
    b = boxes.long()
    ys = torch.arange(output_size[0])[None, :, None]
    xs = torch.arange(output_size[1])[None, None, :]
    inside = ((ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None]) & (xs >= b[:, 0, None, None])
              & (xs < b[:, 2, None, None]))
    return (full > threshold) & inside, full


def _boxes(n, h, w, g):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.8
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([0.0, 0.0, w, h])  # the whole image
    boxes[1] = torch.tensor([w - 0.7, 3.0, w - 0.2, 9.0])  # inside one pixel column: empty after truncation
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes


@pytest.mark.parametrize("low,input_size,output_size", [
    ((24, 32), (96, 128), (96, 128)),  # same size
    ((24, 32), (93, 125), (186, 250)),  # padded input, upscaled output
    ((25, 30), (99, 117), (61, 73)),  # downscaled output
    ((8, 8), (32, 29), (480, 640)),  # large upscaling
    ((100, 152), (400, 608), (400, 608)),  # COCO-like: large boxes take the banded products
    ((100, 152), (397, 605), (300, 457)),  # ... and with a downscaled output
])
def test_masks_inside_boxes_equal_the_full_image_computation(low, input_size, output_size):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(12, *low, generator=g)
    probs = torch.where(torch.rand(12, *low, generator=g) > 0.5, probs, 1 - probs) ** 3  # some structure
    boxes = _boxes(12, *output_size, g)
    expected, values = full_image_masks(probs, input_size, output_size, boxes)
    ours = masks_to_image(probs, input_size, output_size, boxes)
    assert ours.shape == expected.shape and ours.dtype == torch.bool
    differ = ours != expected
    # Only float rounding of pixels at the threshold may differ.
    assert ((values[differ] - 0.5).abs() < 1e-5).all()
    assert differ.float().mean() < 1e-4
    assert expected.any() and not ours[1].any()


@pytest.mark.parametrize("low,input_size,output_size", [
    ((100, 152), (397, 605), (480, 731)),
    ((100, 152), (400, 608), (90, 137)),  # strong downscale: pixels skip cells
])
def test_sparse_masks_equal_the_full_image_computation(low, input_size, output_size):
    """Masks with few or no cells above the threshold: only pixels near those cells are computed."""
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(10, *low, generator=g) * 0.5  # all at or below the threshold
    for m, (y, x, r) in enumerate([(5, 7, 1), (50, 80, 3), (99, 151, 1), (0, 0, 2), (30, 140, 6), (70, 10, 1)]):
        probs[m + 2, max(y - r, 0) : y + r, max(x - r, 0) : x + r] = 0.5 + 0.5 * torch.rand(1, generator=g)
    probs[9, 20, 20] = 0.5  # equal to the threshold: not above it
    boxes = _boxes(10, *output_size, g)
    boxes[2:] = torch.tensor([0.0, 0.0, output_size[1], output_size[0]])
    expected, values = full_image_masks(probs, input_size, output_size, boxes)
    ours = masks_to_image(probs, input_size, output_size, boxes)
    differ = ours != expected
    assert ((values[differ] - 0.5).abs() < 1e-5).all() and differ.float().mean() < 1e-4
    assert expected[2:8].any((1, 2)).sum() >= 5 and not ours[[0, 1, 9]].any()


@pytest.mark.parametrize("low_len,in_len,out_len", [(100, 397, 480), (100, 400, 90), (8, 29, 640), (25, 99, 61)])
def test_pixels_touching_cells_are_contiguous_and_found(low_len, in_len, out_len):
    from diffusioninst.modeling import postprocess

    band = postprocess._ResizeBand(postprocess._resize_weights(low_len, in_len, out_len, 4, torch.device("cpu")),
                                   torch.float32)
    touching = band.weights != 0  # (out_len, low_len)
    for a, b, c0, c1 in [(0, out_len, 0, 1), (0, out_len, low_len - 1, low_len), (3, out_len - 2, 10, 13),
                         (out_len // 2, out_len, 0, 5), (0, out_len // 3, low_len // 2, low_len)]:
        hit = touching[a:b, c0:c1].any(1).nonzero().flatten() + a
        p0, p1 = band.pixels(a, b, c0, c1)
        assert list(range(p0, p1)) == hit.tolist()


def test_mask_head_on_box_cells_only_equals_the_head_on_the_whole_map():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 8, 100, 152, generator=g)
    params = torch.randn(16, 153, generator=g) * 0.4
    input_size, output_size = (397, 605), (480, 731)
    boxes = _boxes(16, *output_size, g)
    probs = dynamic_mask_logits(feats, params, torch.zeros(16, dtype=torch.long)).sigmoid()
    expected, values = full_image_masks(probs, input_size, output_size, boxes)
    ours = masks_to_image(DynamicMaskWindows(feats[0], params), input_size, output_size, boxes)
    differ = ours != expected
    assert ((values[differ] - 0.5).abs() < 1e-5).all() and differ.float().mean() < 1e-4
    assert expected[2:].any() and not ours[1].any()


def test_no_masks():
    out = masks_to_image(torch.zeros(0, 8, 8), (32, 32), (64, 64), torch.zeros(0, 4))
    assert out.shape == (0, 64, 64)


def test_select_topk_does_not_repeat_per_class():
    logits = torch.tensor([[0.0, 3.0], [2.0, -1.0], [1.0, 4.0]])
    boxes = torch.arange(12.0).view(3, 4)
    filters = torch.arange(9.0).view(3, 3)
    scores, labels, b, f = select_topk(logits, boxes, filters, 3)
    torch.testing.assert_close(scores, torch.tensor([4.0, 3.0, 2.0]).sigmoid())
    assert labels.tolist() == [1, 1, 0]
    assert torch.equal(b, boxes[[2, 0, 1]]) and torch.equal(f, filters[[2, 0, 1]])


def test_nms_and_cap():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 1])
    assert nms_and_cap(boxes, scores, labels, 0.5, True, 0).tolist() == [0, 2, 3]
    assert nms_and_cap(boxes, scores, labels, 0.5, True, 2).tolist() == [0, 2]
    assert nms_and_cap(boxes, scores, labels, 0.5, False, 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("low_len,in_len,out_len", [(152, 608, 608), (152, 605, 1210), (152, 605, 301)])
def test_banded_resize_product_equals_the_dense_one(monkeypatch, low_len, in_len, out_len):
    from diffusioninst.modeling import postprocess

    weights = postprocess._resize_weights(low_len, in_len, out_len, 4, torch.device("cpu"))
    band = postprocess._ResizeBand(weights, torch.float32)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or bmm(*a))
    g = torch.Generator().manual_seed(0)
    for a, b in [(0, out_len), (3, out_len - 5), (out_len // 3, out_len // 3 + 70), (10, 40)]:
        c0, c1 = band.cells(a, b)
        x = torch.rand(c1 - c0, 9, generator=g)
        dense = weights[a:b, c0:c1].float() @ x
        assert weights[a:b, :c0].abs().sum() == 0 and weights[a:b, c1:].abs().sum() == 0  # the run holds every weight
        torch.testing.assert_close(band.apply(a, b, x), dense, rtol=1e-5, atol=1e-6)
    assert calls, "the banded product was never taken"


@pytest.mark.parametrize("low,input_size", [((24, 32), (96, 128)), ((25, 30), (99, 117)), ((100, 152), (397, 605))])
def test_dense_masks_of_the_export_path_equal_the_banded_ones(low, input_size):
    """The ONNX export computes masks at the input size with whole-image operations: the same masks."""
    from diffusioninst.modeling.postprocess import masks_to_image_dense

    g = torch.Generator().manual_seed(5)
    probs = torch.rand(12, *low, generator=g)
    probs = torch.where(torch.rand(12, *low, generator=g) > 0.5, probs, 1 - probs) ** 3
    boxes = _boxes(12, *input_size, g)
    expected, values = full_image_masks(probs, input_size, input_size, boxes)
    dense = masks_to_image_dense(probs, input_size, boxes)
    assert dense.dtype == torch.bool and dense.shape == expected.shape
    differ = dense != expected
    assert ((values[differ] - 0.5).abs() < 1e-5).all() and differ.float().mean() < 1e-4
    banded = masks_to_image(probs, input_size, input_size, boxes)
    assert (dense != banded).float().mean() < 1e-4 and expected.any()
