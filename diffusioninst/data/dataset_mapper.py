"""DiffusionInst's dataset mapper: DiffusionDet/DETR-style augmentation and instance masks as bitmasks."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks

__all__ = ["DiffusionInstDatasetMapper", "build_diffusioninst_augmentation"]


def build_diffusioninst_augmentation(cfg, is_train: bool) -> list[T.Augmentation]:
    """The original DiffusionInst augmentation, as one list usable by ``T.AugmentationList``.

    Training: ``RandomFlip`` then ``ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN)``; with
    ``INPUT.CROP.ENABLED``, half of the images also get ``ResizeShortestEdge(INPUT.CROP_RESIZE_SIZES)`` and
    ``RandomCrop(INPUT.CROP.TYPE, INPUT.CROP.SIZE)`` between the two (the original's
    ``tfm_gens[:-1] + crop_gen + tfm_gens[-1:]``). Inference: ``ResizeShortestEdge(MIN/MAX_SIZE_TEST)``.
    """
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    augmentations: list[T.Augmentation] = [T.RandomFlip()]
    if cfg.INPUT.CROP.ENABLED:
        crop = T.AugmentationList(
            [
                T.ResizeShortestEdge(list(cfg.INPUT.CROP_RESIZE_SIZES), sample_style="choice"),
                T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
            ]
        )
        augmentations.append(T.RandomApply(crop, prob=0.5))
    augmentations.append(
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    )
    return augmentations


def _transform_segmentation(
    segm: Any, transforms: T.TransformList, image_shape: tuple[int, int]
) -> np.ndarray:
    """Transform one instance's segmentation (polygons, COCO RLE or HxW mask) to an HxW uint8 mask."""
    h, w = image_shape
    if isinstance(segm, list):
        # Polygons: move the vertices, then rasterize at the output size. Rasterizing clips to the image,
        # so crops need no polygon clipping (fvcore's CropTransform.apply_polygons would need shapely).
        polygons = [np.array(p, dtype=np.float64).reshape(-1, 2) for p in segm if len(p) >= 6]
        polygons = [transforms.apply_coords(p).reshape(-1) for p in polygons]
        return utils.polygons_to_bitmask(polygons, h, w).astype(np.uint8)
    if isinstance(segm, dict):
        if isinstance(segm["counts"], list):
            segm = mask_util.frPyObjects(segm, *segm["size"])
        mask = mask_util.decode(segm)
    elif isinstance(segm, np.ndarray) and segm.ndim == 2:
        mask = segm
    else:
        raise ValueError(
            f"Unsupported segmentation of type {type(segm).__name__}: expected polygons (list), COCO RLE "
            "(dict) or an HxW mask (ndarray)"
        )
    mask = transforms.apply_segmentation(mask.astype(np.uint8))
    if mask.shape != (h, w):
        raise ValueError(f"A transformed instance mask has shape {mask.shape}, the image has {(h, w)}")
    return mask


class DiffusionInstDatasetMapper(DatasetMapper):
    """``DatasetMapper`` for DiffusionInst: its augmentation, instance masks always on and as ``BitMasks``.

    Crowd annotations are dropped. Training images without instances are kept and get empty ``Instances``
    (``gt_boxes`` (0, 4), ``gt_classes`` (0,), ``gt_masks`` BitMasks (0, H, W)).
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: list[T.Augmentation | T.Transform],
        image_format: str,
        recompute_boxes: bool = False,
    ):
        """
        Args:
            is_train: training (annotations are mapped to ``instances``) or inference.
            augmentations: augmentations or deterministic transforms, applied in order.
            image_format: format passed to :func:`detection_utils.read_image`, e.g. "RGB".
            recompute_boxes: replace boxes by the tight boxes of the transformed masks. Off by default, as in
                the original release (after a crop, a box is the crop-clipped original box).
        """
        super().__init__(
            is_train,
            augmentations=augmentations,
            image_format=image_format,
            use_instance_mask=True,
            instance_mask_format="bitmask",
            recompute_boxes=recompute_boxes,
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict[str, Any]:
        """Constructor arguments from a config: the augmentation and ``INPUT.FORMAT``."""
        return {
            "is_train": is_train,
            "augmentations": build_diffusioninst_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        """Read, augment and convert one dataset dict (it is not modified) to the model's input format."""
        if self.is_train and "annotations" not in dataset_dict:
            dataset_dict = {**dataset_dict, "annotations": []}
        return super().__call__(dataset_dict)

    def _transform_annotations(
        self, dataset_dict: dict, transforms: T.TransformList, image_shape: tuple[int, int]
    ) -> None:
        """Replace ``annotations`` by ``instances``; masks are rasterized directly at the output size."""
        annos = []
        for obj in dataset_dict.pop("annotations"):
            if obj.get("iscrowd", 0) != 0:
                continue
            if "segmentation" not in obj:
                raise ValueError(
                    f"An annotation of {dataset_dict.get('file_name', 'an image')} has no 'segmentation': "
                    "DiffusionInst trains on instance masks"
                )
            segm = obj.pop("segmentation")
            obj.pop("keypoints", None)
            obj = utils.transform_instance_annotations(obj, transforms, image_shape)
            obj["segmentation"] = _transform_segmentation(segm, transforms, image_shape)
            annos.append(obj)

        instances = utils.annotations_to_instances(annos, image_shape, mask_format="bitmask")
        if not instances.has("gt_masks"):
            instances.gt_masks = BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))
        if self.recompute_boxes:
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
