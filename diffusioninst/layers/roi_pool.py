"""detectron2's multi-level ``ROIPooler`` without host syncs, for devices that queue kernels (GPUs)."""
from __future__ import annotations

from typing import List

import torch
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes
from torch import Tensor

from .roi_align import ROIAlignCPU

__all__ = ["LevelSelectROIPooler"]


class LevelSelectROIPooler(ROIPooler):
    """``ROIPooler`` (same arguments, no parameters, same outputs bit for bit) whose multi-level path pools every
    box at every level and keeps each box's own level with ``torch.where``.

    detectron2's pooler gathers each level's boxes with ``nonzero`` and sizes the batch index with a tensor of
    counts: five host syncs per call on a GPU. This path has static shapes (L times the RoIAlign work, which a GPU
    does in parallel). The CPU kernels (``ROIAlignCPU`` on CPU tensors) keep detectron2's sparse path, the faster
    one on CPU cores.
    """

    def forward(self, x: List[Tensor], box_lists: List[Boxes]) -> Tensor:
        """Features [(B, C, H_l, W_l)] and B ``Boxes`` (abs xyxy) -> (sum of boxes, C, S, S)."""
        sparse = x[0].device.type == "cpu" and type(self.level_poolers[0]) is ROIAlignCPU
        if sparse or len(self.level_poolers) == 1 or len(box_lists) == 0:
            return super().forward(x, box_lists)
        sizes = [len(b) for b in box_lists]
        device = x[0].device
        if len(set(sizes)) == 1:
            index = torch.arange(len(sizes), device=device).repeat_interleave(sizes[0])
        else:
            index = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(sizes)])
        boxes = torch.cat([b.tensor for b in box_lists])
        rois = torch.cat([index[:, None].to(boxes.dtype), boxes], dim=1)
        levels = assign_boxes_to_levels(box_lists, self.min_level, self.max_level, self.canonical_box_size,
                                        self.canonical_level)[:, None, None, None]
        output = self.level_poolers[0](x[0], rois)
        for level in range(1, len(self.level_poolers)):
            output = torch.where(levels == level, self.level_poolers[level](x[level], rois), output)
        return output
