"""Data: the synthetic shapes dataset, dataset registration and DiffusionInst's dataset mapper.

Importing this package registers ``shapes_train`` and ``shapes_val`` (files are generated on first use),
as ``detectron2.data.datasets.builtin`` does for COCO and LVIS.
"""
from .dataset_mapper import DiffusionInstDatasetMapper, build_diffusioninst_augmentation
from .datasets import SHAPES_SPLITS, class_image_count, register_datasets_from_cfg, register_shapes
from .shapes import SHAPES_CATEGORIES, generate_shapes_dataset, shapes_dataset_paths

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_SPLITS",
    "DiffusionInstDatasetMapper",
    "build_diffusioninst_augmentation",
    "class_image_count",
    "generate_shapes_dataset",
    "register_datasets_from_cfg",
    "register_shapes",
    "shapes_dataset_paths",
]

register_shapes()
