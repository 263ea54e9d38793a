"""Loss primitives of DiffusionInst: dice, federated-loss class sampling and box losses (focal: fvcore's)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .box_ops import elementwise_generalized_box_iou

__all__ = [
    "dice_loss",
    "federated_loss_classes",
    "fed_loss_class_weights",
    "l1_box_loss",
    "giou_loss",
]


def dice_loss(mask_probs: Tensor, targets: Tensor) -> Tensor:
    """CondInst dice loss 1 - 2<x,t> / (|x|^2 + |t|^2 + 1e-5) of (M, H, W) or (M, HW) probabilities -> (M,)."""
    num = mask_probs.shape[0]
    x = mask_probs.reshape(num, -1)
    t = targets.reshape(num, -1)
    intersection = (x * t).sum(dim=1)
    union = (x**2.0).sum(dim=1) + (t**2.0).sum(dim=1) + 1e-5
    return 1.0 - 2 * intersection / union


def federated_loss_classes(
    gt_classes: Tensor,
    num_fed_loss_classes: int,
    num_classes: int,
    weight: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Classes kept by the federated loss: unique gt classes (R,) in [0, K] plus negatives drawn by weight (K,) -> (C,).

    The background index K is never drawn; it is returned only when it occurs in gt_classes (detectron2 semantics).
    """
    unique_gt = torch.unique(gt_classes)
    if len(unique_gt) >= num_fed_loss_classes:
        return unique_gt
    prob = unique_gt.new_ones(num_classes + 1).float()
    prob[-1] = 0
    prob[:num_classes] = weight.float().clone()
    prob[unique_gt] = 0
    # With few classes (a small LVIS-format dataset) there may be fewer candidates than places: take them all.
    num_negatives = min(num_fed_loss_classes - len(unique_gt), int((prob > 0).sum()))
    if num_negatives <= 0:
        return unique_gt
    negatives = torch.multinomial(prob, num_negatives, replacement=False, generator=generator)
    return torch.cat([unique_gt, negatives])


def fed_loss_class_weights(class_image_count: Sequence[dict[str, Any]], power: float = 0.5) -> Tensor:
    """Per-class sampling weight image_count ** power, sorted by class id -> (K,) float32."""
    counts = torch.tensor([c["image_count"] for c in sorted(class_image_count, key=lambda c: c["id"])])
    return counts.float() ** power


def l1_box_loss(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """L1 distance of normalised xyxy boxes (M, 4) x (M, 4), summed over coordinates -> (M,)."""
    return F.l1_loss(pred_boxes, target_boxes, reduction="none").sum(-1)


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """1 - GIoU of matching xyxy boxes (M, 4) x (M, 4) -> (M,), without the pairwise matrix."""
    return 1 - elementwise_generalized_box_iou(pred_boxes, target_boxes)
