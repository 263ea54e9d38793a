"""Data: the synthetic shapes dataset (COCO and LVIS format), dataset registration and validation, and
DiffusionInst's dataset mapper.

Importing this package registers ``shapes_train``, ``shapes_val`` and their LVIS-format versions
``shapes_lvis_train``, ``shapes_lvis_val`` (files are generated on first use),
as ``detectron2.data.datasets.builtin`` does for COCO and LVIS.
"""
from .dataset_mapper import DiffusionInstDatasetMapper, ImageReadError, build_diffusioninst_augmentation, read_image
from .datasets import (
    SHAPES_LVIS_SPLITS,
    SHAPES_SPLITS,
    class_image_count,
    install_validating_loaders,
    load_lvis_format,
    register_datasets_from_cfg,
    register_lvis_format,
    register_shapes,
    register_shapes_lvis,
)
from .shapes import (
    SHAPES_CATEGORIES,
    SHAPES_LVIS_FREQUENCY,
    generate_shapes_dataset,
    shapes_dataset_paths,
    shapes_lvis_paths,
    write_shapes_lvis,
)
from .coco_json import load_coco_checked
from .shared_dataset import SerializedRecords, get_detection_dataset_shared, load_once_per_machine
from .validation import DatasetValidationError, validate_records

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_LVIS_FREQUENCY",
    "SHAPES_LVIS_SPLITS",
    "SHAPES_SPLITS",
    "DatasetValidationError",
    "SerializedRecords",
    "DiffusionInstDatasetMapper",
    "ImageReadError",
    "build_diffusioninst_augmentation",
    "class_image_count",
    "generate_shapes_dataset",
    "get_detection_dataset_shared",
    "install_validating_loaders",
    "load_lvis_format",
    "load_coco_checked",
    "load_once_per_machine",
    "read_image",
    "register_datasets_from_cfg",
    "register_lvis_format",
    "register_shapes",
    "register_shapes_lvis",
    "shapes_dataset_paths",
    "shapes_lvis_paths",
    "validate_records",
    "write_shapes_lvis",
]

register_shapes()
register_shapes_lvis()
