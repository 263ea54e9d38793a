"""From decoder outputs to detectron2 ``Instances``: top-k over (proposal, class), NMS, masks at full size.

Two paths give the same detections: a sparse one for CPU cores (masks computed box by box, only where a cell can
pass the threshold: few multiply-adds, many small ops and host reads per detection) and a batched one for GPUs (a
constant number of batched ops and host syncs whatever the number of detections: ``batched=True``).
"""
from __future__ import annotations

import bisect
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torchvision
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances

from .dynamic_mask_head import DynamicMaskWindows, parse_dynamic_params
from .mask_branch import aligned_bilinear

__all__ = [
    "detections_to_instances", "select_topk", "nms_and_cap", "masks_to_image", "masks_to_image_batched",
    "masks_to_image_dense", "mask_extent_boxes",
]

BAND_CHUNK = 64  # output rows (columns) per tile of the banded mask-resize products
MASK_CHUNK_ELEMENTS = 1 << 27  # output pixels of a chunk of detections, batched mask path (512 MB of float32)


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
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, nms_thresh: float, use_nms: bool, max_dets: int,
    batched: bool = False,
) -> torch.Tensor:
    """Indices surviving per-class NMS (if enabled), sorted by score, at most ``max_dets`` (<= 0: no cap).

    ``batched``: always one NMS over boxes offset by class (detectron2's ``batched_nms`` also does this below 1000
    boxes on CPU, 5000 on GPU; above, it runs one NMS per class, with a host sync each).
    """
    if use_nms and batched:
        boxes = boxes.float()
        offsets = labels.to(boxes) * (boxes.max() + 1)
        keep = torchvision.ops.nms(boxes + offsets[:, None], scores, nms_thresh)
    elif use_nms:
        keep = batched_nms(boxes.float(), scores, labels, nms_thresh)
    else:
        keep = scores.argsort(descending=True)
    return keep[:max_dets] if max_dets > 0 else keep


def detections_to_instances(
    steps: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], mask_feats: torch.Tensor,
    input_size: Tuple[int, int], output_size: Tuple[int, int], *, num_proposals: int, nms_thresh: float,
    use_nms: bool, max_detections: int, mask_head_layout: Tuple[int, int, int], mask_threshold: float,
    batched: bool = False,
) -> Instances:
    """One image's ``Instances`` at ``output_size`` from its sampling steps' last-stage (logits (N, K), boxes (N, 4)
    abs xyxy at ``input_size``, filters (N, P)) and its F_mask (c, h, w).

    Top-``num_proposals`` (proposal, class) pairs of every step are pooled, per-class NMS'd, rescaled to the output
    size and clipped; the first ``max_detections`` (<= 0: all) non-empty boxes get binary masks. The sparse path
    (default) runs the dynamic mask head only inside their boxes; ``batched`` runs it and the resize on whole maps
    for all detections at once (:func:`masks_to_image_batched`), with the same results.
    """
    candidates = [select_topk(logits, boxes, filters, num_proposals) for logits, boxes, filters in steps]
    scores, labels, boxes, filters = (torch.cat(c) for c in zip(*candidates))
    keep = nms_and_cap(boxes, scores, labels, nms_thresh, use_nms, 0, batched)  # capped after empty boxes are dropped
    out_boxes = Boxes(boxes[keep])
    out_boxes.scale(output_size[1] / input_size[1], output_size[0] / input_size[0])
    out_boxes.clip(output_size)
    nonempty = out_boxes.nonempty().nonzero().squeeze(1)
    if max_detections > 0:
        nonempty = nonempty[:max_detections]
    keep, out_boxes = keep[nonempty], out_boxes[nonempty]
    out = Instances(output_size)
    out.pred_boxes = out_boxes
    out.scores = scores[keep]
    out.pred_classes = labels[keep]
    if batched:
        out.pred_masks = masks_to_image_batched(mask_feats, filters[keep], mask_head_layout, input_size, output_size,
                                                out_boxes.tensor, mask_threshold)
        return out
    windows = DynamicMaskWindows(mask_feats, filters[keep], *mask_head_layout)
    out.pred_masks = masks_to_image(windows, input_size, output_size, out_boxes.tensor, mask_threshold)
    return out


def masks_to_image_dense(
    mask_probs: torch.Tensor, input_size: Tuple[int, int], boxes: torch.Tensor, threshold: float = 0.5, stride: int = 4,
) -> torch.Tensor:
    """What :func:`masks_to_image` computes with ``output_size == input_size``, as whole-image operations of static
    rank (the ONNX export's path): probabilities (M, h, w) upsampled x``stride`` (aligned), cropped to the unpadded
    input, thresholded and zeroed outside each box (M, 4) -> (M, H, W) bool."""
    full = aligned_bilinear(mask_probs[:, None], stride)[:, 0, : input_size[0], : input_size[1]]
    b = boxes.long()
    ys = torch.arange(full.shape[1], device=full.device)[None, :, None]
    xs = torch.arange(full.shape[2], device=full.device)[None, None, :]
    inside = (ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None]) & (xs >= b[:, 0, None, None]) & (
        xs < b[:, 2, None, None])
    return (full > threshold) & inside


def masks_to_image_batched(
    mask_feats: torch.Tensor, filters: torch.Tensor, mask_head_layout: Tuple[int, int, int],
    input_size: Tuple[int, int], output_size: Tuple[int, int], boxes: torch.Tensor, threshold: float = 0.5,
    stride: int = 4,
) -> torch.Tensor:
    """What :func:`masks_to_image` computes for ``DynamicMaskWindows(mask_feats, filters, *mask_head_layout)``, in a
    constant number of batched ops per chunk of detections and no host reads: the dynamic mask head on the whole
    map, then the resize as rows_weights @ probs @ cols_weights^T (the same sums as the sparse path's, whose terms
    outside the band are exact zeros here).

    mask_feats (c, h, w), filters (M, P), boxes (M, 4) in output coordinates -> bool (M, H_out, W_out). Chunks of
    detections hold at most ``MASK_CHUNK_ELEMENTS`` output pixels (the float intermediates are that large).
    """
    out_h, out_w = output_size
    num = filters.shape[0]
    result = torch.zeros((num, out_h, out_w), dtype=torch.bool, device=mask_feats.device)
    if num == 0:
        return result
    c, low_h, low_w = mask_feats.shape
    wy = _resize_weights(low_h, input_size[0], out_h, stride, mask_feats.device).to(mask_feats.dtype)  # (H, h)
    wx_t = _resize_weights(low_w, input_size[1], out_w, stride, mask_feats.device).to(mask_feats.dtype).t()  # (w, W)
    weights, biases = parse_dynamic_params(filters, *mask_head_layout)
    feats = mask_feats.reshape(c, low_h * low_w)
    b = boxes.long()
    ys = torch.arange(out_h, device=b.device)
    xs = torch.arange(out_w, device=b.device)
    in_rows = ((ys >= b[:, 1:2]) & (ys < b[:, 3:4]))[:, :, None]  # (M, H, 1)
    in_cols = ((xs >= b[:, 0:1]) & (xs < b[:, 2:3]))[:, None, :]  # (M, 1, W)
    chunk = max(1, MASK_CHUNK_ELEMENTS // (out_h * out_w))
    for start in range(0, num, chunk):
        stop = min(start + chunk, num)
        x = feats.expand(stop - start, c, low_h * low_w)
        for layer, (w, bias) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(bias[start:stop, :, None], w[start:stop], x)
            if layer < len(weights) - 1:
                x = x.relu_()
        probs = x.view(stop - start, low_h, low_w).sigmoid_()
        values = torch.matmul(wy, torch.matmul(probs, wx_t))  # (m, H, W): along x first, as the sparse path
        torch.gt(values, threshold, out=result[start:stop])
        result[start:stop] &= in_rows[start:stop] & in_cols[start:stop]
    return result


def _resize_weights(low_len: int, in_len: int, out_len: int, stride: int, device: torch.device) -> torch.Tensor:
    """(out_len, low_len) float64 weights of one axis: how each output pixel mixes the mask cells.

    The composition of CondInst's aligned x``stride`` upsampling (pixel q samples cell coordinate
    max(q - stride // 2, 0) / stride, the last cell replicated), the crop to ``in_len`` pixels and PyTorch's
    bilinear resize to ``out_len`` (align_corners=False: pixel r samples (r + 0.5) * in_len / out_len - 0.5,
    clamped at 0), so that masks can be computed inside their boxes only.
    """
    q = torch.arange(in_len, dtype=torch.float64, device=device)
    c = (q - stride // 2).clamp(min=0) / stride
    a0 = c.floor().long().clamp(max=low_len - 1)
    fa = c - a0
    a1 = (a0 + 1).clamp(max=low_len - 1)
    r = torch.arange(out_len, dtype=torch.float64, device=device)
    src = ((r + 0.5) * (in_len / out_len) - 0.5).clamp(min=0)
    b0 = src.floor().long().clamp(max=in_len - 1)
    fb = src - b0
    b1 = (b0 + 1).clamp(max=in_len - 1)
    weights = torch.zeros((out_len, low_len), dtype=torch.float64, device=device)
    rows = torch.arange(out_len, device=device)
    for b, wb in ((b0, 1 - fb), (b1, fb)):
        weights.index_put_((rows, a0[b]), wb * (1 - fa[b]), accumulate=True)
        weights.index_put_((rows, a1[b]), wb * fa[b], accumulate=True)
    return weights


def _true_span(flags: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last True index along the last axis of bool (..., L) -> two (...) long tensors
    (L and 0 where a row has no True)."""
    length = flags.shape[-1]
    idx = torch.arange(length, device=flags.device)
    return torch.where(flags, idx, length).amin(-1), torch.where(flags, idx, -1).amax(-1) + 1


def _span(flags: List[bool]) -> Tuple[int, int]:
    """First and one-past-last index of True in a list that has one."""
    return flags.index(True), len(flags) - flags[::-1].index(True)


def masks_to_image(
    mask_probs: Union[torch.Tensor, DynamicMaskWindows],
    input_size: Tuple[int, int],
    output_size: Tuple[int, int],
    boxes: torch.Tensor,
    threshold: float = 0.5,
    stride: int = 4,
) -> torch.Tensor:
    """Binary masks (M, H_out, W_out) from probabilities (M, h, w) at stride 4 of the padded input: a tensor, or
    ``DynamicMaskWindows`` that computes only the cells each box needs.

    Equals: aligned x4 upsampling, crop to the unpadded input (h_in, w_in), bilinear resize to the output size,
    threshold, zero outside each box (``boxes`` (M, 4) in output coordinates, clipped; pixels [x1, x2) x [y1, y2)
    of the integer-truncated box). Computed inside each box only, and there only for the pixels that touch a cell
    above the threshold, as (rows x cells) @ probs @ (cells x cols) with banded products, instead of resizing every
    mask to the full image.
    """
    out_h, out_w = output_size
    result = torch.zeros((len(mask_probs), out_h, out_w), dtype=torch.bool, device=mask_probs.device)
    if len(mask_probs) == 0:
        return result
    low_h, low_w = mask_probs.shape[-2:]
    band_y = _ResizeBand(_resize_weights(low_h, input_size[0], out_h, stride, mask_probs.device), mask_probs.dtype)
    band_x = _ResizeBand(_resize_weights(low_w, input_size[1], out_w, stride, mask_probs.device), mask_probs.dtype)
    for m, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        if x2 <= x1 or y2 <= y1:
            continue
        (cy0, cy1), (cx0, cx1) = band_y.cells(y1, y2), band_x.cells(x1, x2)
        if isinstance(mask_probs, DynamicMaskWindows):
            window = mask_probs.window(m, cy0, cy1, cx0, cx1)
        else:
            window = mask_probs[m, cy0:cy1, cx0:cx1]
        # Every output pixel is a convex mix of cells: only pixels touching a cell above the threshold can pass it.
        above = window > threshold
        rows = above.any(1).tolist()
        if True not in rows:
            continue
        (r0, r1), (k0, k1) = _span(rows), _span(above.any(0).tolist())
        ya, yb = band_y.pixels(y1, y2, cy0 + r0, cy0 + r1)
        xa, xb = band_x.pixels(x1, x2, cx0 + k0, cx0 + k1)
        if yb <= ya or xb <= xa:  # a strong downscale skips cells: no pixel touches those above the threshold
            continue
        (sy0, sy1), (sx0, sx1) = band_y.cells(ya, yb), band_x.cells(xa, xb)
        sub = window[sy0 - cy0 : sy1 - cy0, sx0 - cx0 : sx1 - cx0]
        # rows @ window @ cols^T: first along x (box columns x cells), then along y.
        values = band_y.apply(ya, yb, band_x.apply(xa, xb, sub.t()).t())
        torch.gt(values, threshold, out=result[m, ya:yb, xa:xb])
    return result


class _ResizeBand:
    """One axis' resize weights (out_len, low_len); every output pixel mixes a short run of cells.

    ``apply`` multiplies the weights of output pixels [a, b) with the cells they touch, ``BAND_CHUNK`` pixels at a
    time against only the cells of that chunk (one batched product): a dense product would spend
    low_len/run multiply-adds per useful one on large boxes.
    """

    def __init__(self, weights: torch.Tensor, dtype: torch.dtype):
        first, last = _true_span(weights != 0)
        self.weights = weights.to(dtype)
        self.first, self.last = first, last
        self.first_list, self.last_list = first.tolist(), last.tolist()

    def cells(self, a: int, b: int) -> Tuple[int, int]:
        """The run of cells [c0, c1) that output pixels [a, b) touch."""
        return self.first_list[a], self.last_list[b - 1]

    def pixels(self, a: int, b: int, c0: int, c1: int) -> Tuple[int, int]:
        """The output pixels [p0, p1) within [a, b) that touch some cell in [c0, c1) (p1 <= p0 if none); the runs
        start and end at nondecreasing cells, so these pixels are contiguous."""
        p0 = bisect.bisect_right(self.last_list, c0, a, b)
        return p0, bisect.bisect_left(self.first_list, c1, p0, b)

    def apply(self, a: int, b: int, x: torch.Tensor) -> torch.Tensor:
        """weights[a:b, c0:c1] @ x for x (c1 - c0, m) -> (b - a, m), with (c0, c1) = ``cells(a, b)``."""
        c0, c1 = self.cells(a, b)
        n, chunk = b - a, BAND_CHUNK
        if n <= chunk:
            return self.weights[a:b, c0:c1] @ x
        num_chunks = -(-n // chunk)
        rows = (a + torch.arange(num_chunks * chunk, device=x.device)).clamp(max=b - 1).view(num_chunks, chunk)
        first, last = self.first[rows[:, 0]], self.last[rows].amax(1)
        width = int((last - first).max())
        if 2 * width > c1 - c0:  # the runs cover most cells: the dense product is as cheap
            return self.weights[a:b, c0:c1] @ x
        cells = first.clamp(max=c1 - width)[:, None] + torch.arange(width, device=x.device)  # (chunks, width)
        tiles = self.weights[rows[:, :, None], cells[:, None, :]]  # (chunks, chunk, width)
        return torch.bmm(tiles, x[cells - c0]).view(num_chunks * chunk, -1)[:n]


def mask_extent_boxes(
    mask_logits: torch.Tensor, stride: int, fallback: torch.Tensor, region: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Abs xyxy boxes (M, 4) enclosing the cells with logit > 0 of masks (M, h, w) at ``stride``.

    Cell (i, j) covers pixels [stride*j, stride*(j+1)) x [stride*i, stride*(i+1)). With ``region`` (M, 4) abs xyxy,
    only cells whose centre lies inside it count. ``fallback`` (M, 4) is returned where no cell counts.
    """
    positive = mask_logits > 0
    if region is not None:
        h, w = mask_logits.shape[-2:]
        cy = (torch.arange(h, device=mask_logits.device) + 0.5) * stride
        cx = (torch.arange(w, device=mask_logits.device) + 0.5) * stride
        in_y = (cy[None, :] >= region[:, 1:2]) & (cy[None, :] <= region[:, 3:4])
        in_x = (cx[None, :] >= region[:, 0:1]) & (cx[None, :] <= region[:, 2:3])
        positive = positive & in_y[:, :, None] & in_x[:, None, :]
    rows = positive.any(2)
    (y1, y2), (x1, x2) = _true_span(rows), _true_span(positive.any(1))
    boxes = torch.stack([x1, y1, x2, y2], dim=1).to(fallback.dtype) * stride
    return torch.where(rows.any(1)[:, None], boxes, fallback)
