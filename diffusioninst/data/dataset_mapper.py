"""DiffusionInst's dataset mapper: DiffusionDet/DETR-style augmentation and instance masks as bitmasks."""
from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks
from detectron2.utils.file_io import PathManager

from ..errors import UserError

__all__ = ["DiffusionInstDatasetMapper", "ImageReadError", "build_diffusioninst_augmentation", "read_image"]

logger = logging.getLogger(__name__)

_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageReadError(UserError, OSError):
    """An image file that cannot be decoded (missing, corrupt, truncated, not an image); names the file."""


def read_image(file_name: str, format: str | None = None) -> np.ndarray:
    """``detectron2.data.detection_utils.read_image`` that also reads 16-bit and 32-bit images correctly.

    EXIF orientation is applied, as detectron2 does (annotations are in the orientation a viewer shows). Grayscale,
    palette, RGBA (alpha dropped) and CMYK images become ``format`` (e.g. 3-channel RGB or BGR). PIL converts
    16-bit images to 8 bits by clipping at 255 (a nearly white image); here they are scaled (65535 -> 255).
    32-bit integer images are scaled the same way when their values exceed 255, float images from [0, 1].
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image = utils._apply_exif_orientation(image)
        if image.mode in _HIGH_BIT_DEPTH_MODES:
            array = np.asarray(image)
            if image.mode == "F":
                array = np.nan_to_num(array, nan=0.0) * (255.0 if np.nanmax(array) <= 1.0 else 1.0)
            elif image.mode != "I" or array.max() > 255:
                array = array.astype(np.float64) * (255.0 / 65535.0)
            image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
        return utils.convert_PIL_to_numpy(image, format)


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


def _describe_read_error(dataset_dict: dict, error: Exception, hint: bool) -> Exception:
    """The exception for an image that could not be read or whose size does not match its record.

    ``hint``: mention DATASETS.SKIP_INVALID (training with the switch off).
    """
    file_name = dataset_dict["file_name"]
    hint = " or set DATASETS.SKIP_INVALID True to skip such images in training" if hint else ""
    if isinstance(error, utils.SizeMismatchError):
        expected = (dataset_dict.get("width"), dataset_dict.get("height"))
        message = str(error)
        try:
            with PathManager.open(file_name, "rb") as f, Image.open(f) as raw:
                raw_size, exif = raw.size, raw.getexif().get(274)
        except Exception:
            raw_size, exif = None, None
        if exif in (5, 6, 7, 8):
            message += (
                f" The file has EXIF orientation {exif} (a 90-degree rotation, applied when reading, as viewers "
                f"and most annotation tools do); stored {raw_size[0]}x{raw_size[1]}, read {raw_size[1]}x"
                f"{raw_size[0]}: the record's width/height {expected[0]}x{expected[1]} and its coordinates must "
                "be those of the rotated image. Re-annotate on the rotated image or strip the EXIF orientation."
            )
        return utils.SizeMismatchError(f"{message} Fix the record{hint}.")
    image_id = dataset_dict.get("image_id")
    entry = f" (image id {image_id!r})" if image_id is not None else ""
    return ImageReadError(
        f"cannot read image {file_name}{entry}: {type(error).__name__}: {error}. The file is missing, corrupt, "
        f"truncated or not an image: replace it or remove it from the dataset{hint}"
    )


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
    (``gt_boxes`` (0, 4), ``gt_classes`` (0,), ``gt_masks`` BitMasks (0, H, W)). Images are read with
    :func:`read_image`. An image that cannot be read, or whose size differs from its record's, raises an error
    naming the file; in training with ``skip_invalid`` (``DATASETS.SKIP_INVALID``) it is skipped with a warning
    instead (the mapper returns None and detectron2's ``MapDataset`` uses another image). Semantic segmentation
    and precomputed proposals, which DiffusionInst does not use, are not read.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: list[T.Augmentation | T.Transform],
        image_format: str,
        recompute_boxes: bool = False,
        skip_invalid: bool = False,
    ):
        """
        Args:
            is_train: training (annotations are mapped to ``instances``) or inference.
            augmentations: augmentations or deterministic transforms, applied in order.
            image_format: format passed to :func:`detection_utils.read_image`, e.g. "RGB".
            recompute_boxes: replace boxes by the tight boxes of the transformed masks. Off by default, as in
                the original release (after a crop, a box is the crop-clipped original box).
            skip_invalid: in training, skip unreadable images with a warning (return None) instead of raising.
        """
        super().__init__(
            is_train,
            augmentations=augmentations,
            image_format=image_format,
            use_instance_mask=True,
            instance_mask_format="bitmask",
            recompute_boxes=recompute_boxes,
        )
        self.skip_invalid = skip_invalid
        self._skipped: set[str] = set()

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict[str, Any]:
        """Constructor arguments from a config: the augmentation and ``INPUT.FORMAT``."""
        return {
            "is_train": is_train,
            "augmentations": build_diffusioninst_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "skip_invalid": bool(cfg.DATASETS.get("SKIP_INVALID", False)),
        }

    def __call__(self, dataset_dict: dict) -> dict | None:
        """Read, augment and convert one dataset dict (it is not modified) to the model's input format.

        Returns None for a skipped image (training with ``skip_invalid`` only).
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        if self.is_train:
            dataset_dict.setdefault("annotations", [])
        image = self._read(dataset_dict)
        if image is None:
            return None
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        try:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            file_name = dataset_dict.get("file_name", "an image")
            if file_name in str(e):
                raise
            raise ValueError(f"{file_name}: cannot use its annotations: {type(e).__name__}: {e}") from e
        return dataset_dict

    def _read(self, dataset_dict: dict) -> np.ndarray | None:
        """The image of ``dataset_dict`` checked against its width/height; None if skipped."""
        file_name = dataset_dict["file_name"]
        try:
            image = read_image(file_name, format=self.image_format)
            utils.check_image_size(dataset_dict, image)
            return image
        except Exception as e:
            skip = self.is_train and self.skip_invalid
            error = _describe_read_error(dataset_dict, e, hint=self.is_train and not skip)
            if not skip:
                raise error from e
            if file_name not in self._skipped:
                self._skipped.add(file_name)
                logger.warning("%s; skipped (DATASETS.SKIP_INVALID), another image is used in its place", error)
            return None

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
