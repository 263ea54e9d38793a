"""Dataset registration: the synthetic shapes splits, and COCO-format datasets declared in the config.

detectron2 registers COCO and LVIS itself (``detectron2.data.datasets.builtin``, under
``$DETECTRON2_DATASETS``); this module adds what DiffusionInst's configs and tools need beyond that.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from .shapes import SHAPES_CATEGORIES, generate_shapes_dataset, shapes_dataset_paths

__all__ = ["SHAPES_SPLITS", "class_image_count", "register_datasets_from_cfg", "register_shapes"]

# Registered dataset name -> split of the shapes dataset.
SHAPES_SPLITS: dict[str, str] = {"shapes_train": "train", "shapes_val": "val"}

_SHAPES_COLORS = [(220, 20, 60), (0, 130, 200), (60, 180, 75), (245, 130, 48)]
_CFG_KEY = "DATASETS.COCO_INSTANCES"


def _default_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _load_shapes(root: str, name: str) -> list[dict]:
    """Load one shapes split, generating the dataset first (with default arguments) if it is missing."""
    json_file, image_root = shapes_dataset_paths(root, SHAPES_SPLITS[name])
    if not os.path.isfile(json_file):
        generate_shapes_dataset(root)
    return load_coco_json(json_file, image_root, name)


def register_shapes(root: str | None = None) -> None:
    """Register ``shapes_train`` and ``shapes_val`` (COCO-style, evaluated with COCOEvaluator).

    Nothing is generated here: the files under ``<root>/shapes`` are created on the first
    ``DatasetCatalog.get`` if missing. ``root`` defaults to ``$DETECTRON2_DATASETS`` (else ``datasets``).
    Names that are already registered are left alone, so calling this twice is harmless.
    """
    root = os.path.expanduser(root) if root is not None else _default_root()
    metadata = {
        "thing_classes": [c["name"] for c in SHAPES_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(SHAPES_CATEGORIES)},
        "thing_colors": list(_SHAPES_COLORS),
    }
    for name, split in SHAPES_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        json_file, image_root = shapes_dataset_paths(root, split)
        register_coco_instances(name, metadata, json_file, image_root)
        # Same metadata as any COCO-format dataset; only the loader differs (it may generate first).
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda root=root, name=name: _load_shapes(root, name))


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _parse_entry(index: int, entry: Any) -> tuple[str, str, str]:
    if (
        isinstance(entry, (str, bytes))
        or not isinstance(entry, Sequence)
        or len(entry) != 3
        or not all(isinstance(x, str) and x for x in entry)
    ):
        raise ValueError(
            f"{_CFG_KEY}[{index}] must be a (name, json_file, image_root) triple of non-empty strings, "
            f"got {entry!r}"
        )
    name, json_file, image_root = entry
    return name, json_file, image_root


def register_datasets_from_cfg(cfg) -> list[str]:
    """Register each ``(name, json_file, image_root)`` of ``cfg.DATASETS.COCO_INSTANCES`` as a COCO dataset.

    Lets a config or command line train/evaluate on any COCO-format data without code changes. Returns the
    declared names in order. A name already registered with the same files is skipped; with other files, or
    a malformed entry, raises ValueError; a missing json file or image directory raises FileNotFoundError.
    All entries are checked before any is registered.
    """
    entries = cfg.DATASETS.get("COCO_INSTANCES", ())
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise ValueError(f"{_CFG_KEY} must be a sequence of (name, json_file, image_root), got {entries!r}")
    declared: dict[str, tuple[str, str]] = {}
    to_register = []
    for index, entry in enumerate(entries):
        name, json_file, image_root = _parse_entry(index, entry)
        if name in declared or name in DatasetCatalog.list():
            if name in declared:
                old_json, old_root = declared[name]
            else:
                meta = MetadataCatalog.get(name)
                old_json, old_root = meta.get("json_file"), meta.get("image_root")
            if (
                old_json is not None
                and old_root is not None
                and _same_path(old_json, json_file)
                and _same_path(old_root, image_root)
            ):
                declared[name] = (json_file, image_root)
                continue
            raise ValueError(
                f"{_CFG_KEY}[{index}] {tuple(entry)!r}: dataset {name!r} is already registered with "
                f"json_file={old_json!r}, image_root={old_root!r}; choose another name"
            )
        if not os.path.isfile(json_file):
            raise FileNotFoundError(
                f"{_CFG_KEY}[{index}]: json file of dataset {name!r} not found: {json_file}"
            )
        if not os.path.isdir(image_root):
            raise FileNotFoundError(
                f"{_CFG_KEY}[{index}]: image directory of dataset {name!r} not found: {image_root}"
            )
        declared[name] = (json_file, image_root)
        to_register.append(name)
    for name in to_register:
        json_file, image_root = declared[name]
        register_coco_instances(name, {}, json_file, image_root)
    return list(declared)


def class_image_count(dataset_name: str, num_classes: int) -> list[dict]:
    """Images containing each class, ``[{"id": contiguous id + 1, "image_count": n}, ...]``, for the federated loss.

    Taken from the metadata's ``class_image_count`` when it has one (detectron2 main's LVIS metadata does);
    otherwise counted from the dataset's records (detectron2 v0.6 ships no counts).
    """
    meta = MetadataCatalog.get(dataset_name)
    if meta.get("class_image_count") is not None:
        return list(meta.class_image_count)
    counts = [0] * num_classes
    for record in DatasetCatalog.get(dataset_name):
        for category in {a["category_id"] for a in record.get("annotations", [])}:
            if not 0 <= category < num_classes:
                raise ValueError(
                    f"dataset {dataset_name!r}: {record.get('file_name')} has category id {category}, outside "
                    f"[0, {num_classes}) (MODEL.DiffusionInst.NUM_CLASSES)"
                )
            counts[category] += 1
    return [{"id": k + 1, "image_count": n} for k, n in enumerate(counts)]
