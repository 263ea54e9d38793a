"""Data: the synthetic shapes dataset, dataset registration and validation, and DiffusionInst's dataset mapper.

Importing this package registers ``shapes_train`` and ``shapes_val`` (files are generated on first use),
as ``detectron2.data.datasets.builtin`` does for COCO and LVIS.
"""
from .dataset_mapper import DiffusionInstDatasetMapper, ImageReadError, build_diffusioninst_augmentation, read_image
from .datasets import SHAPES_SPLITS, class_image_count, register_datasets_from_cfg, register_shapes
from .shapes import SHAPES_CATEGORIES, generate_shapes_dataset, shapes_dataset_paths
from .validation import (
    DatasetValidationError,
    install_validating_loaders,
    load_coco_instances,
    patch_map_dataset_retry,
    validate_records,
)

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_SPLITS",
    "DatasetValidationError",
    "DiffusionInstDatasetMapper",
    "ImageReadError",
    "build_diffusioninst_augmentation",
    "class_image_count",
    "generate_shapes_dataset",
    "install_validating_loaders",
    "load_coco_instances",
    "read_image",
    "register_datasets_from_cfg",
    "register_shapes",
    "shapes_dataset_paths",
    "validate_records",
]

register_shapes()
# detectron2 v0.6's MapDataset cannot retry a skipped sample on Python >= 3.11 (DATASETS.SKIP_INVALID needs it).
patch_map_dataset_retry()
