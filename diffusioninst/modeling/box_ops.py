"""Box conversions and IoU/GIoU, as used by DiffusionDet/DiffusionInst (box deltas: detectron2's Box2BoxTransform)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "elementwise_generalized_box_iou",
]


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    """Convert (..., 4) boxes from (cx, cy, w, h) to (x1, y1, x2, y2)."""
    cx, cy, w, h = x.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    """Convert (..., 4) boxes from (x1, y1, x2, y2) to (cx, cy, w, h)."""
    x1, y1, x2, y2 = x.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of (..., 4) xyxy boxes -> (...)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of xyxy boxes (..., N, 4) x (..., M, 4) -> ((..., N, M), (..., N, M))."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU of xyxy boxes (..., N, 4) x (..., M, 4) -> (..., N, M)."""
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of matching rows of xyxy boxes (..., 4) x (..., 4) -> (...); equals the pairwise diagonal."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / union
    hull = (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    area = hull[..., 0] * hull[..., 1]
    return iou - (area - union) / area
