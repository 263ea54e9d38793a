"""Box conversions, IoU/GIoU and DiffusionDet's delta decoding."""
from __future__ import annotations

import math

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
import torchvision.ops as ops

from diffusioninst.modeling.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)


def _random_xyxy(n: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 50 + 1
    return torch.cat((xy, xy + wh), dim=1)


def test_conversions_round_trip_and_known_values() -> None:
    cxcywh = torch.tensor([[5.0, 6.0, 4.0, 2.0]])
    assert torch.equal(box_cxcywh_to_xyxy(cxcywh), torch.tensor([[3.0, 5.0, 7.0, 7.0]]))
    assert torch.equal(box_xyxy_to_cxcywh(torch.tensor([[3.0, 5.0, 7.0, 7.0]])), cxcywh)
    g = torch.Generator().manual_seed(0)
    boxes = _random_xyxy(20, g).reshape(2, 10, 4)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes)
    assert torch.equal(box_area(torch.tensor([[1.0, 2.0, 4.0, 6.0]])), torch.tensor([12.0]))


def test_iou_and_giou_match_torchvision() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = _random_xyxy(13, g), _random_xyxy(7, g)
    iou, union = box_iou(a, b)
    torch.testing.assert_close(iou, ops.box_iou(a, b))
    torch.testing.assert_close(union, box_area(a)[:, None] + box_area(b)[None] - iou * union)
    torch.testing.assert_close(generalized_box_iou(a, b), ops.generalized_box_iou(a, b))
    batched = generalized_box_iou(torch.stack((a, a)), torch.stack((b, b)))
    assert batched.shape == (2, 13, 7)
    assert torch.equal(batched[1], generalized_box_iou(a, b))


def test_giou_known_values() -> None:
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    far = torch.tensor([[100.0, 100.0, 110.0, 110.0]])
    assert generalized_box_iou(box, box).item() == 1.0
    expected = 0.0 - (110.0 * 110.0 - 200.0) / (110.0 * 110.0)
    assert math.isclose(generalized_box_iou(box, far).item(), expected, rel_tol=1e-6)
    assert generalized_box_iou(box, far).item() < 0
    half = torch.tensor([[0.0, 0.0, 10.0, 5.0]])
    assert math.isclose(generalized_box_iou(box, half).item(), 0.5, rel_tol=1e-6)


def test_elementwise_giou_equals_pairwise_diagonal() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = _random_xyxy(31, g), _random_xyxy(31, g)
    assert torch.equal(elementwise_generalized_box_iou(a, b), torch.diag(generalized_box_iou(a, b)))


def apply_box_deltas(deltas, boxes, weights=(2.0, 2.0, 1.0, 1.0), scale_clamp=math.log(100000.0 / 16)):
    """The decoder's box decoding: detectron2's Box2BoxTransform with DiffusionDet's weights and clamp."""
    return Box2BoxTransform(weights, scale_clamp).apply_deltas(deltas, boxes)


def test_box_decoding_matches_diffusiondet_formula() -> None:
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 8.0, 16.0]])
    deltas = torch.tensor([[0.4, -0.2, 0.3, -0.1], [1.0, 2.0, 50.0, -3.0]])
    out = apply_box_deltas(deltas, boxes)
    clamp = math.log(100000.0 / 16)
    expected = []
    for (x1, y1, x2, y2), (dx, dy, dw, dh) in zip(boxes.tolist(), deltas.tolist()):
        w, h = x2 - x1, y2 - y1
        cx, cy = x1 + 0.5 * w, y1 + 0.5 * h
        dx, dy, dw, dh = dx / 2.0, dy / 2.0, min(dw, clamp), min(dh, clamp)
        pcx, pcy = dx * w + cx, dy * h + cy
        pw, ph = math.exp(dw) * w, math.exp(dh) * h
        expected.append([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph])
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-4)
    assert math.isclose(out[1, 2].item() - out[1, 0].item(), 8.0 * 100000.0 / 16, rel_tol=1e-5)
    zero = apply_box_deltas(torch.zeros(2, 4), boxes)
    assert torch.equal(zero, boxes)
    custom = apply_box_deltas(deltas, boxes, weights=(1.0, 1.0, 1.0, 1.0), scale_clamp=0.0)
    torch.testing.assert_close(custom[:, 2] - custom[:, 0], boxes[:, 2] - boxes[:, 0])
    torch.testing.assert_close(custom[:, 3] - custom[:, 1], (boxes[:, 3] - boxes[:, 1]) * torch.exp(deltas[:, 3]))
    widths = boxes[:, 2] - boxes[:, 0]
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    torch.testing.assert_close((custom[:, 0] + custom[:, 2]) / 2, centres + deltas[:, 0] * widths)
