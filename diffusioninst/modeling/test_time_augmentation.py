"""Test-time augmentation for DiffusionInst: multi-scale and flipped inference, merged by per-class NMS."""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.structures import Boxes, Instances
from torch import nn
from torchvision.ops import batched_nms

from .meta_arch import DiffusionInst

__all__ = ["DiffusionInstWithTTA"]


class DiffusionInstWithTTA(nn.Module):
    """Runs ``model`` on every (shortest-edge size, flip) view of each image and merges the instances.

    With ``scale_ranges`` (one (min, max) per size, cvpods-style), a view keeps only the boxes whose sqrt(area),
    measured in that view, lies in its range: small scales find the large objects, large scales the small ones.
    """

    def __init__(
        self,
        model: DiffusionInst,
        min_sizes: Sequence[int],
        max_size: int,
        flip: bool = True,
        scale_ranges: Optional[Sequence[Tuple[float, float]]] = None,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
    ):
        super().__init__()
        if scale_ranges is not None and len(scale_ranges) != len(min_sizes):
            raise ValueError(
                f"TEST.AUG.SCALE_RANGES has {len(scale_ranges)} entries but TEST.AUG.MIN_SIZES has {len(min_sizes)}"
            )
        self.model = model
        self.min_sizes = list(min_sizes)
        self.max_size = max_size
        self.flip = flip
        self.scale_ranges = None if scale_ranges is None else [tuple(r) for r in scale_ranges]
        self.nms_thresh = nms_thresh
        self.max_detections = max_detections

    @classmethod
    def from_config(cls, cfg, model: DiffusionInst) -> "DiffusionInstWithTTA":
        aug = cfg.TEST.AUG
        return cls(
            model,
            min_sizes=aug.MIN_SIZES,
            max_size=aug.MAX_SIZE,
            flip=aug.FLIP,
            scale_ranges=aug.SCALE_RANGES if aug.SCALE_FILTER else None,
            nms_thresh=cfg.MODEL.DiffusionInst.NMS_THRESH,
            max_detections=cfg.TEST.DETECTIONS_PER_IMAGE,
        )

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        return [{"instances": self._one_image(x)} for x in batched_inputs]

    def _views(self, x: Dict) -> List[Tuple[Dict, bool, Optional[Tuple[float, float]]]]:
        """(model input, flipped, box-size range) for every view, resized from the image at its original size."""
        height, width = x.get("height", x["image"].shape[1]), x.get("width", x["image"].shape[2])
        image = x["image"].permute(1, 2, 0).cpu().numpy()
        if image.shape[:2] != (height, width):
            image = ResizeShortestEdge(min(height, width), max(height, width)).get_transform(image).apply_image(image)
            image = np.ascontiguousarray(image[:height, :width])
        views = []
        for i, size in enumerate(self.min_sizes):
            resized = ResizeShortestEdge(size, self.max_size).get_transform(image).apply_image(image)
            size_range = None if self.scale_ranges is None else self.scale_ranges[i]
            for flipped in (False, True) if self.flip else (False,):
                view = resized[:, ::-1] if flipped else resized
                inp = copy.copy(x)
                inp.update(image=torch.as_tensor(np.ascontiguousarray(view.transpose(2, 0, 1))), height=height, width=width)
                views.append((inp, flipped, size_range))
        return views

    def _one_image(self, x: Dict) -> Instances:
        parts = []
        for inp, flipped, size_range in self._views(x):
            inst = self.model.inference([inp])[0]["instances"]
            if size_range is not None:
                view_scale = inp["image"].shape[1] / inp["height"]
                sides = inst.pred_boxes.area().clamp(min=0).sqrt() * view_scale
                inst = inst[(sides >= size_range[0]) & (sides <= size_range[1])]
            if flipped:
                inst = _hflip(inst)
            parts.append(inst)
        merged = Instances.cat(parts)
        keep = batched_nms(merged.pred_boxes.tensor, merged.scores, merged.pred_classes, self.nms_thresh)
        return merged[keep[: self.max_detections]]


def _hflip(inst: Instances) -> Instances:
    """Mirror boxes and masks of instances predicted on a horizontally flipped image back."""
    out = Instances(inst.image_size)
    width = inst.image_size[1]
    boxes = inst.pred_boxes.tensor
    out.pred_boxes = Boxes(torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1))
    out.scores = inst.scores
    out.pred_classes = inst.pred_classes
    out.pred_masks = inst.pred_masks.flip(-1)
    return out
