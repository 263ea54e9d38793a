"""DiffusionDet's dynamic-k (SimOTA-style) label assignment, batched over images and ground truths."""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou

__all__ = ["DynamicKMatcher", "PaddedTargets", "pad_targets", "in_boxes_and_centers", "dynamic_k_match"]


class PaddedTargets(NamedTuple):
    """A batch's ground truth padded to its largest image's G: labels (B, G) long, boxes (B, G, 4) abs xyxy (padding
    0, 0, 1, 1), valid (B, G) bool, whwh (B, 1, 4) and the number of gts of each image (host ints)."""

    labels: Tensor
    boxes: Tensor
    valid: Tensor
    whwh: Tensor
    counts: List[int]


def pad_targets(targets: List[Dict[str, Tensor]], device: torch.device, dtype: torch.dtype) -> PaddedTargets:
    """Targets (``labels``, ``boxes_xyxy``, ``image_size_xyxy`` per image) as :class:`PaddedTargets` on ``device``,
    without host syncs (the sizes are the tensors' shapes)."""
    counts = [int(t["labels"].shape[0]) for t in targets]
    max_gt = max(counts, default=0)
    valid = torch.arange(max_gt, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
    pad_box = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=dtype, device=device)
    labels = torch.stack([F.pad(t["labels"].to(device), (0, max_gt - n)) for t, n in zip(targets, counts)])
    boxes = torch.stack([torch.cat([t["boxes_xyxy"].to(device, dtype), pad_box.expand(max_gt - n, 4)])
                         for t, n in zip(targets, counts)])
    whwh = torch.stack([t["image_size_xyxy"] for t in targets]).to(device, dtype)[:, None, :]
    return PaddedTargets(labels, boxes, valid, whwh, counts)


def in_boxes_and_centers(pred_boxes: Tensor, gt_boxes: Tensor, center_radius: float = 2.5) -> tuple[Tensor, Tensor]:
    """Centre priors of abs xyxy predictions (..., N, 4) vs gts (..., G, 4).

    Returns fg_mask (..., N) (centre in any gt box or centre region) and in_box & in_centre (..., N, G).
    """
    centers = box_xyxy_to_cxcywh(pred_boxes)
    cx = centers[..., :, 0, None]
    cy = centers[..., :, 1, None]
    gt_cxcywh = box_xyxy_to_cxcywh(gt_boxes)
    gt_xyxy = box_cxcywh_to_xyxy(gt_cxcywh)
    gx1, gy1, gx2, gy2 = (v[..., None, :] for v in gt_xyxy.unbind(-1))
    in_boxes = (cx > gx1) & (cx < gx2) & (cy > gy1) & (cy < gy2)
    gcx = gt_cxcywh[..., None, :, 0]
    gcy = gt_cxcywh[..., None, :, 1]
    rx = center_radius * (gx2 - gx1)
    ry = center_radius * (gy2 - gy1)
    in_centers = (cx > gcx - rx) & (cx < gcx + rx) & (cy > gcy - ry) & (cy < gcy + ry)
    fg_mask = in_boxes.any(-1) | in_centers.any(-1)
    return fg_mask, in_boxes & in_centers


def _keep_min_cost_gt(matching: Tensor, cost: Tensor, rows: Tensor) -> Tensor:
    """Reassign every flagged query row (B, N) to its single lowest-cost gt of cost (B, N, G)."""
    best = torch.zeros_like(matching).scatter_(-1, cost.argmin(-1, keepdim=True), True)
    return torch.where(rows[..., None], best, matching)


def dynamic_k_match(cost: Tensor, ious: Tensor, valid: Tensor, ota_k: int = 5) -> Tensor:
    """Dynamic-k assignment from cost and IoU (B, N, G), valid gt columns (B, G) -> bool matching (B, N, G).

    Invalid columns must hold +inf cost; ``cost`` is modified in place like the original's.
    """
    num_queries = cost.shape[1]
    k_max = min(num_queries, ota_k)
    topk_ious = torch.topk(ious, k_max, dim=1).values
    dynamic_ks = torch.clamp(topk_ious.sum(1).int(), min=1, max=k_max)
    order = torch.topk(cost, k_max, dim=1, largest=False).indices
    ranks = torch.arange(k_max, device=cost.device).view(1, -1, 1)
    take = (ranks < dynamic_ks[:, None, :]) & valid[:, None, :]
    matching = torch.zeros(cost.shape, dtype=torch.bool, device=cost.device).scatter_(1, order, take)

    stale_multi = matching.sum(-1) > 1
    matching = _keep_min_cost_gt(matching, cost, stale_multi)

    unmatched = valid & ~matching.any(1)
    active = unmatched.any(-1)
    while bool(active.any()):
        bump = matching.any(-1) & active[:, None]
        cost.copy_(torch.where(bump[..., None], cost + 100000.0, cost))
        pos = cost.argmin(1, keepdim=True)
        added = torch.zeros_like(matching).scatter_(1, pos, unmatched[:, None, :])
        updated = matching | added
        conflict = ((updated.sum(-1) > 1).any(-1) & active)[:, None]
        # Like the original: conflicts are resolved on the queries multi-matched BEFORE the loop (stale mask).
        updated = _keep_min_cost_gt(updated, cost, stale_multi & conflict)
        progressed = (updated != matching).flatten(1).any(-1)
        matching = updated
        # The original would spin forever when an iteration changes nothing (all queries matched); stop such images.
        unmatched = valid & ~matching.any(1) & progressed[:, None]
        active = unmatched.any(-1)
    return matching


class DynamicKMatcher(nn.Module):
    """DiffusionDet's HungarianMatcherDynamicK: each gt takes its k lowest-cost queries, k from its top IoUs."""

    @configurable
    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        ota_k: int = 5,
        use_focal: bool = True,
        use_fed_loss: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        center_radius: float = 2.5,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.ota_k = ota_k
        self.use_focal = use_focal
        self.use_fed_loss = use_fed_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.center_radius = center_radius

    @classmethod
    def from_config(cls, cfg) -> dict:
        d = cfg.MODEL.DiffusionInst
        return {
            "cost_class": d.CLASS_WEIGHT, "cost_bbox": d.L1_WEIGHT, "cost_giou": d.GIOU_WEIGHT, "ota_k": d.OTA_K,
            "use_focal": d.USE_FOCAL, "use_fed_loss": d.USE_FED_LOSS, "focal_alpha": d.ALPHA, "focal_gamma": d.GAMMA,
            "center_radius": d.CENTER_RADIUS,
        }

    def _class_cost(self, prob: Tensor) -> Tensor:
        """Classification cost from the gt-class probabilities (B, N, G) -> (B, N, G)."""
        if self.use_focal:
            alpha, gamma = self.focal_alpha, self.focal_gamma
            neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
            pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
            return pos - neg
        if self.use_fed_loss:
            return (-(prob + 1e-8).log()) - (-(1 - prob + 1e-8).log())
        return -prob

    @torch.no_grad()
    def forward(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match (B, N, K) logits and (B, N, 4) abs xyxy boxes to targets.

        Returns per image (selected (N,) bool, gt index of each selected query (S,) long).
        """
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {pred_logits.shape[0]}")
        selected, first_gt = self.match(pred_logits, pred_boxes, pad_targets(targets, pred_logits.device,
                                                                             pred_boxes.dtype))
        per_image = first_gt[selected].split(selected.sum(-1).tolist())
        return list(zip(selected.unbind(0), per_image))

    @torch.no_grad()
    def match(self, pred_logits: Tensor, pred_boxes: Tensor, gt: PaddedTargets) -> Tuple[Tensor, Tensor]:
        """Batched matching of (B, N, K) logits and (B, N, 4) abs xyxy boxes to padded targets -> selected (B, N)
        bool and the gt index (B, N) long of each selected query (0 elsewhere)."""
        batch, num_queries = pred_logits.shape[:2]
        if gt.labels.shape[1] == 0:
            zeros = torch.zeros((batch, num_queries), dtype=torch.long, device=pred_logits.device)
            return zeros.bool(), zeros
        labels, gt_boxes, valid, whwh = gt.labels, gt.boxes.to(pred_boxes), gt.valid, gt.whwh.to(pred_boxes)

        if self.use_focal or self.use_fed_loss:
            prob = pred_logits.sigmoid()
        else:
            prob = pred_logits.softmax(-1)
        prob = torch.gather(prob, 2, labels[:, None, :].expand(-1, num_queries, -1))

        fg_mask, inside = in_boxes_and_centers(pred_boxes, gt_boxes, self.center_radius)
        ious = box_iou(pred_boxes, gt_boxes)[0]
        cost_bbox = torch.cdist(pred_boxes / whwh, gt_boxes / whwh, p=1)
        cost_giou = -generalized_box_iou(pred_boxes, gt_boxes)
        cost = (
            self.cost_bbox * cost_bbox
            + self.cost_class * self._class_cost(prob)
            + self.cost_giou * cost_giou
            + 100.0 * (~inside)
        )
        cost = torch.where(fg_mask[..., None], cost, cost + 10000.0)
        cost = torch.where(valid[:, None, :], cost, torch.full_like(cost, float("inf")))
        ious = torch.where(valid[:, None, :], ious, torch.zeros_like(ious))

        matching = dynamic_k_match(cost, ious, valid, self.ota_k)
        return matching.any(-1), matching.to(torch.uint8).argmax(-1)
