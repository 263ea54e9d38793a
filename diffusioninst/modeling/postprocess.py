"""From decoder outputs to detectron2 ``Instances``: top-k over (proposal, class), NMS, masks at full size."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import batched_nms

from .mask_branch import aligned_bilinear

__all__ = ["select_topk", "nms_and_cap", "masks_to_image", "box_region_masks", "mask_extent_boxes"]


def select_topk(
    logits: torch.Tensor, boxes: torch.Tensor, filters: torch.Tensor, k: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (proposal, class) pairs by sigmoid score without repeating boxes/filters per class.

    logits (N, K), boxes (N, 4), filters (N, P) -> scores (k,), labels (k,), boxes (k, 4), filters (k, P),
    sorted by score (descending).
    """
    num_classes = logits.shape[1]
    scores, idx = logits.sigmoid().flatten().topk(min(k, logits.numel()), sorted=True)
    proposal = torch.div(idx, num_classes, rounding_mode="floor")
    return scores, idx % num_classes, boxes[proposal], filters[proposal]


def nms_and_cap(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, nms_thresh: float, use_nms: bool, max_dets: int
) -> torch.Tensor:
    """Indices surviving per-class NMS (if enabled), sorted by score, at most ``max_dets`` (<= 0: no cap)."""
    if use_nms:
        keep = batched_nms(boxes.float(), scores, labels, nms_thresh)
    else:
        keep = scores.argsort(descending=True)
    return keep[:max_dets] if max_dets > 0 else keep


def box_region_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bool (M, H, W), True inside [x1, x2) x [y1, y2) of each box with integer-truncated coordinates."""
    b = boxes.long()
    ys = torch.arange(height, device=boxes.device)
    xs = torch.arange(width, device=boxes.device)
    in_y = (ys[None, :] >= b[:, 1:2]) & (ys[None, :] < b[:, 3:4])
    in_x = (xs[None, :] >= b[:, 0:1]) & (xs[None, :] < b[:, 2:3])
    return in_y[:, :, None] & in_x[:, None, :]


def masks_to_image(
    mask_probs: torch.Tensor,
    input_size: Tuple[int, int],
    output_size: Tuple[int, int],
    boxes: torch.Tensor,
    threshold: float = 0.5,
    stride: int = 4,
    chunk: int = 32,
) -> torch.Tensor:
    """Binary masks (M, H_out, W_out) from probabilities (M, h, w) at stride 4 of the padded input.

    Aligned x4 upsampling, crop to the unpadded input (h_in, w_in), bilinear resize to the output size,
    threshold, and zero outside each box (``boxes`` (M, 4) in output coordinates, already clipped).
    """
    h_in, w_in = input_size
    out_h, out_w = output_size
    result = torch.zeros((len(mask_probs), out_h, out_w), dtype=torch.bool, device=mask_probs.device)
    for start in range(0, len(mask_probs), chunk):
        probs = mask_probs[start : start + chunk, None]
        full = aligned_bilinear(probs, stride)[:, :, :h_in, :w_in]
        full = F.interpolate(full, size=(out_h, out_w), mode="bilinear", align_corners=False)[:, 0]
        region = box_region_masks(boxes[start : start + chunk], out_h, out_w)
        result[start : start + chunk] = (full > threshold) & region
    return result


def mask_extent_boxes(
    mask_logits: torch.Tensor, stride: int, fallback: torch.Tensor, region: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Abs xyxy boxes (M, 4) enclosing the cells with logit > 0 of masks (M, h, w) at ``stride``.

    Cell (i, j) covers pixels [stride*j, stride*(j+1)) x [stride*i, stride*(i+1)). With ``region`` (M, 4) abs xyxy,
    only cells whose centre lies inside it count. ``fallback`` (M, 4) is returned where no cell counts.
    """
    positive = mask_logits > 0
    h, w = mask_logits.shape[-2:]
    ys = torch.arange(h, device=mask_logits.device)
    xs = torch.arange(w, device=mask_logits.device)
    if region is not None:
        cy, cx = (ys + 0.5) * stride, (xs + 0.5) * stride
        in_y = (cy[None, :] >= region[:, 1:2]) & (cy[None, :] <= region[:, 3:4])
        in_x = (cx[None, :] >= region[:, 0:1]) & (cx[None, :] <= region[:, 2:3])
        positive = positive & in_y[:, :, None] & in_x[:, None, :]
    rows, cols = positive.any(2), positive.any(1)
    y1 = torch.where(rows, ys, h).amin(1)
    y2 = torch.where(rows, ys, -1).amax(1) + 1
    x1 = torch.where(cols, xs, w).amin(1)
    x2 = torch.where(cols, xs, -1).amax(1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).to(fallback.dtype) * stride
    return torch.where(rows.any(1)[:, None], boxes, fallback)
