"""DiffusionInst's inference on one image as a graph of static rank, for ONNX: normalisation and padding, backbone,
mask branch, the decoder over the unrolled DDIM steps (box renewal, ensemble), top-k, NMS and masks at the input size.

Where the PyTorch path uses shape-dependent shortcuts (the mask head run only inside each box, the banded mask
resize), this path computes the same masks densely (``masks_to_image_dense``; tests/test_postprocess.py proves the
two equal). The randomness is an input: the initial boxes, and for more than one step the DDIM and renewal noise.
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from detectron2.layers import batched_nms
from detectron2.structures import ImageList
from torch import nn

from ..layers import use_cpu_kernels
from ..modeling.dynamic_mask_head import parse_dynamic_params
from ..modeling.meta_arch import DiffusionInst
from ..modeling.postprocess import masks_to_image_dense, select_topk

__all__ = ["ExportableDiffusionInst"]


def dense_mask_logits(mask_feats: torch.Tensor, params: torch.Tensor, layout: Tuple[int, int, int]) -> torch.Tensor:
    """The dynamic mask head of M instances on one image's whole F_mask (1, C, h, w) -> logits (M, h, w), as batched
    products of static rank (``dynamic_mask_logits`` loops over chunks of instances, which tracing would freeze)."""
    weights, biases = parse_dynamic_params(params, *layout)
    x = mask_feats.flatten(2)  # (1, C, L), broadcast over the instances
    for layer, (w, b) in enumerate(zip(weights, biases)):
        x = torch.matmul(w, x) + b[..., None]
        if layer < len(weights) - 1:
            x = torch.relu(x)
    return x[:, 0].reshape(-1, *mask_feats.shape[-2:])


class ExportableDiffusionInst(nn.Module):
    """``forward(image (1, 3, H, W) float 0-255 in INPUT.FORMAT order, init_boxes (1, N, 4)[, step_noise
    (SAMPLE_STEP - 1, 2, 1, N, 4)])`` -> boxes (K, 4) xyxy in input pixels, scores (K,), classes (K,) int64, masks
    (K, H, W) bool, with K <= TEST.DETECTIONS_PER_IMAGE; what ``model.inference`` gives for an input of that size.

    The model is copied (with plain torch layers instead of the CPU kernels, which have no ONNX form).
    """

    def __init__(self, model: DiffusionInst):
        super().__init__()
        if model.filter_denoising or model.head.boxes_from_masks:
            raise ValueError("ONNX export supports the paper's method: MODEL.DiffusionInst.FILTER_DENOISING False and "
                             "USE_BOX_LOSS True")
        self.model = use_cpu_kernels(copy.deepcopy(model).cpu().eval(), False)
        self.model.channels_last = self.model.compile_backbone = False
        self.steps = len(self.model.sampler.time_pairs)

    def forward(self, image: torch.Tensor, init_boxes: torch.Tensor, step_noise: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        x = (image[0] - m.pixel_mean) / m.pixel_std
        images = ImageList.from_tensors([x], m.backbone.size_divisibility)  # pads with traced sizes when tracing
        h, w = images.image_sizes[0]
        whwh = torch.stack([torch.as_tensor(v) for v in (w, h, w, h)]).float()[None]
        features, mask_feats = m.extract_features(images)

        def decode(boxes: torch.Tensor, filter_signal: Optional[torch.Tensor], t: torch.Tensor):
            logits, pred_boxes, filters = m.head(features, boxes, t, filter_signal, mask_feats, whwh)
            return logits[-1], pred_boxes[-1], filters[-1]

        steps = m.sampler.sample(decode, whwh, init_boxes, None, step_noise)
        candidates = [select_topk(logits[0], boxes[0], filters[0], m.num_proposals) for logits, boxes, filters in steps]
        scores, labels, boxes, filters = (torch.cat(c) for c in zip(*candidates))
        keep = batched_nms(boxes, scores, labels, m.nms_thresh) if m.use_nms else scores.argsort(descending=True)
        boxes = torch.min(torch.max(boxes[keep], torch.zeros_like(whwh)), whwh)  # clipped to the input
        nonempty = ((boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)).nonzero()[:, 0]
        if m.max_detections > 0:
            nonempty = nonempty[: m.max_detections]
        keep, boxes = keep[nonempty], boxes[nonempty]
        logits = dense_mask_logits(mask_feats, filters[keep], m.mask_head_layout)
        masks = masks_to_image_dense(logits.sigmoid(), (h, w), boxes, m.mask_threshold)
        return boxes, scores[keep], labels[keep], masks
