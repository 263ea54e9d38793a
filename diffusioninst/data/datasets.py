"""Dataset registration: the synthetic shapes splits (COCO and LVIS format), the COCO- and LVIS-format datasets
declared in the config, and the checks of ``validation.py`` / ``coco_json.py`` installed in front of every dataset a
run uses.

detectron2 registers COCO and LVIS itself (``detectron2.data.datasets.builtin``, under ``$DETECTRON2_DATASETS``); this
module adds what DiffusionInst's configs and tools need beyond that.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Callable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_lvis_json, register_coco_instances

from ..config import ConfigError
from .shapes import SHAPES_CATEGORIES, generate_shapes_dataset, shapes_dataset_paths, shapes_lvis_paths, write_shapes_lvis
from .coco_json import check_categories, load_coco_checked, parsed_json, read_json
from .validation import (
    NUM_CLASSES_KEY, DatasetFileNotFoundError, DatasetValidationError, ValidationOptions, validate_records,
)

__all__ = [
    "SHAPES_LVIS_SPLITS",
    "install_validating_loaders",
    "SHAPES_SPLITS",
    "class_image_count",
    "load_lvis_format",
    "register_datasets_from_cfg",
    "register_lvis_format",
    "register_shapes",
]

# Registered dataset name -> split of the shapes dataset.
SHAPES_SPLITS: dict[str, str] = {"shapes_train": "train", "shapes_val": "val"}
# Registered dataset name -> split of the LVIS-format shapes dataset (same images, federated labels, long tail).
SHAPES_LVIS_SPLITS: dict[str, str] = {"shapes_lvis_train": "train", "shapes_lvis_val": "val"}

_SHAPES_COLORS = [(220, 20, 60), (0, 130, 200), (60, 180, 75), (245, 130, 48)]
PREPARE = "_diffusioninst_prepare"  # set on a loader (the shapes dataset's): called before its JSON file is read
_CFG_KEY = "DATASETS.COCO_INSTANCES"
logger = logging.getLogger(__name__)
_LVIS_CFG_KEY = "DATASETS.LVIS_INSTANCES"


def _default_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _ensure_shapes(root: str, name: str) -> None:
    """Generate the shapes dataset (with default arguments) if the split's json file is missing."""
    if not os.path.isfile(shapes_dataset_paths(root, SHAPES_SPLITS[name])[0]):
        generate_shapes_dataset(root)


def _load_shapes(root: str, name: str) -> list[dict]:
    """Load one shapes split, generating the dataset first (with default arguments) if it is missing."""
    _ensure_shapes(root, name)
    json_file, image_root = shapes_dataset_paths(root, SHAPES_SPLITS[name])
    return load_coco_json(json_file, image_root, name)


def _shapes_loader(root: str, name: str):
    def load() -> list[dict]:
        return _load_shapes(root, name)

    # The validating loader (coco_json.py) reads the registered JSON file itself: it generates it first.
    setattr(load, PREPARE, lambda: _ensure_shapes(root, name))
    return load


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
        DatasetCatalog.register(name, _shapes_loader(root, name))


def register_shapes_lvis(root: str | None = None) -> None:
    """Register ``shapes_lvis_train`` and ``shapes_lvis_val``: the shapes images with LVIS-v1-format labels
    (:func:`.shapes.write_shapes_lvis`, written on the first ``DatasetCatalog.get`` if missing), evaluated with
    LVIS's federated metrics. Names already registered are left alone."""
    root = os.path.expanduser(root) if root is not None else _default_root()
    for name, split in SHAPES_LVIS_SPLITS.items():
        if name not in DatasetCatalog.list():
            register_lvis_format(name, *shapes_lvis_paths(root, split), prepare=lambda: write_shapes_lvis(root))


def register_lvis_format(name: str, json_file: str, image_root: str, prepare=None) -> None:
    """Register an LVIS-v1-format dataset (evaluated by LVIS's federated protocol). ``prepare()``, if given, runs
    before each load (e.g. to write the file)."""

    def load() -> list[dict]:
        if prepare is not None:
            prepare()
        return load_lvis_format(json_file, image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="lvis")


def load_lvis_format(json_file: str, image_root: str, dataset_name: str) -> list[dict]:
    """Records of an LVIS-v1-format file by detectron2's ``load_lvis_json``, after checking what it assumes, and
    the dataset's metadata from the file's categories: ``thing_classes`` and, when the categories carry
    ``image_count`` (as LVIS's do), ``class_image_count`` for the federated loss."""
    where = f"dataset {dataset_name!r} ({json_file})"
    data = read_json(json_file, where)
    names = check_categories(data.get("categories") or [], where)
    ids = sorted(names)
    if ids != list(range(1, len(ids) + 1)):
        raise DatasetValidationError(
            f"{where}: LVIS-format category ids must be 1..{len(ids)} (detectron2 reads id k as class k - 1); "
            f"found {ids[:8]}{' ...' if len(ids) > 8 else ''}. Use DATASETS.COCO_INSTANCES for other ids"
        )
    for i, img in enumerate(data.get("images") or []):
        if not isinstance(img, dict) or not isinstance(img.get("coco_url"), str) or img["coco_url"].count("/") < 1:
            raise DatasetValidationError(
                f"{where}: images[{i}] has no 'coco_url'; LVIS-format images are found at <image_root>/<folder>/<file> "
                "from the last two parts of their coco_url (e.g. http://images.cocodataset.org/val2017/x.jpg -> "
                "<image_root>/val2017/x.jpg), as in LVIS v1"
            )
    meta = MetadataCatalog.get(dataset_name)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    meta.thing_classes = [c["name"] for c in categories]
    if all(isinstance(c.get("image_count"), int) for c in categories):
        meta.class_image_count = [{"id": c["id"], "image_count": c["image_count"]} for c in categories]
    with parsed_json(json_file, data):  # load_lvis_json reads the file again otherwise
        return load_lvis_json(json_file, os.path.join(image_root, ""))


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _relative_note(path: str) -> str:
    return "" if os.path.isabs(os.path.expanduser(path)) else f" (relative to the working directory {os.getcwd()})"


def _parse_entry(key: str, index: int, entry: Any) -> tuple[str, str, str]:
    if (
        isinstance(entry, (str, bytes))
        or not isinstance(entry, Sequence)
        or len(entry) != 3
        or not all(isinstance(x, str) and x for x in entry)
    ):
        raise ConfigError(
            f"{key}[{index}] must be a (name, json_file, image_root) triple of non-empty strings, got {entry!r}"
        )
    name, json_file, image_root = entry
    return name, json_file, image_root


def _declared_datasets(cfg, key: str, declared: dict[str, tuple[str, str]]) -> list[str]:
    """Check the entries of ``cfg.<key>`` (a config key holding (name, json_file, image_root) triples); returns the
    names to register and records every entry in ``declared``."""
    entries = cfg.DATASETS.get(key.split(".", 1)[1], ())
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise ConfigError(f"{key} must be a sequence of (name, json_file, image_root), got {entries!r}")
    to_register = []
    for index, entry in enumerate(entries):
        name, json_file, image_root = _parse_entry(key, index, entry)
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
            raise ConfigError(
                f"{key}[{index}] {tuple(entry)!r}: dataset {name!r} is already registered with "
                f"json_file={old_json!r}, image_root={old_root!r}; choose another name"
            )
        if not os.path.isfile(json_file):
            what = "is a directory, not a file" if os.path.isdir(json_file) else "not found"
            raise DatasetFileNotFoundError(
                f"{key}[{index}]: json file of dataset {name!r} {what}: {json_file}{_relative_note(json_file)}"
            )
        if not os.path.isdir(image_root):
            what = "is a file, not a directory" if os.path.isfile(image_root) else "not found"
            raise DatasetFileNotFoundError(
                f"{key}[{index}]: image directory of dataset {name!r} {what}: {image_root}"
                f"{_relative_note(image_root)}"
            )
        declared[name] = (json_file, image_root)
        to_register.append(name)
    return to_register


def register_datasets_from_cfg(cfg) -> list[str]:
    """Register each ``(name, json_file, image_root)`` of ``cfg.DATASETS.COCO_INSTANCES`` as a COCO-format dataset
    and of ``cfg.DATASETS.LVIS_INSTANCES`` as an LVIS-format one (evaluated with LVIS's federated metrics).

    Lets a config or command line train/evaluate on any COCO- or LVIS-format data without code changes. Returns the
    declared names in order. A name already registered with the same files is skipped; with other files, or
    a malformed entry, raises ValueError; a missing json file or image directory raises FileNotFoundError.
    All entries are checked before any is registered.

    Then the loaders of the datasets named in ``DATASETS.TRAIN`` and ``DATASETS.TEST`` (from any source) are
    replaced by validating ones (:func:`install_validating_loaders`): bad annotation files, missing
    images and a ``MODEL.DiffusionInst.NUM_CLASSES`` that disagrees with the data fail with an error naming the
    file and the entry when the dataset is first loaded, before training; ``DATASETS.SKIP_INVALID`` drops bad
    entries with a warning instead.
    """
    declared: dict[str, tuple[str, str]] = {}
    coco = _declared_datasets(cfg, _CFG_KEY, declared)
    lvis = _declared_datasets(cfg, _LVIS_CFG_KEY, declared)
    for name in coco:
        register_coco_instances(name, {}, *declared[name])
    for name in lvis:
        register_lvis_format(name, *declared[name])
    install_validating_loaders(cfg)
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


# ----------------------------------------------------------------------------------------------------------------
# The checks of validation.py / coco_json.py installed in the DatasetCatalog

_ORIGINAL = "_diffusioninst_original_loader"


def check_num_classes(dataset_name: str, options: ValidationOptions) -> None:
    """NUM_CLASSES must equal the dataset's number of categories (its metadata's ``thing_classes``)."""
    meta = MetadataCatalog.get(dataset_name)
    classes = meta.get("thing_classes")
    if options.num_classes is None or classes is None or len(classes) == options.num_classes:
        return
    source = f" ({meta.json_file})" if meta.get("json_file") else ""
    raise DatasetValidationError(
        f"dataset {dataset_name!r}{source} has {len(classes)} categories but {NUM_CLASSES_KEY} is "
        f"{options.num_classes}; set {NUM_CLASSES_KEY} {len(classes)} (in the config or on the command line), or fix "
        "the dataset's categories")


def load_validated(name: str, loader: Callable[[], Any], options: ValidationOptions) -> list[dict]:
    """Load dataset ``name`` (whose registered loader is ``loader``) with the checks of ``options``."""
    meta = MetadataCatalog.get(name)
    source = meta.get("json_file") or "its registered loader"
    checked = "annotations and image files (headers)" if options.check_image_files else (
        "annotations (image files not checked: DATASETS.CHECK_IMAGE_FILES False)")
    logger.info("dataset %r: loading %s and checking its %s", name, source, checked)
    start = time.perf_counter()
    if getattr(loader, PREPARE, None) is not None:
        getattr(loader, PREPARE)()
    if meta.get("evaluator_type") == "coco" and meta.get("json_file") and meta.get("image_root"):
        records = load_coco_checked(meta.json_file, meta.image_root, name, options)  # register_coco_instances
    else:
        try:
            loaded = loader()
        except FileNotFoundError:
            json_file = meta.get("json_file")
            if json_file and "://" not in json_file and not os.path.isfile(json_file):
                read_json(json_file, f"dataset {name!r}")  # raises the message that says where the file is looked for
            raise
        records = validate_records(loaded, name, options)
    check_num_classes(name, options)
    if options.is_train and meta.get("class_image_count") is None and options.num_classes is not None:
        counts = [0] * options.num_classes  # images of each class, for the federated loss
        for record in records:
            for k in {a["category_id"] for a in record.get("annotations", ()) if not a.get("iscrowd", 0)}:
                counts[k] += 1
        meta.class_image_count = [{"id": k + 1, "image_count": n} for k, n in enumerate(counts)]
    logger.info("dataset %r: %d images, %d annotations, loaded and checked in %.1f s", name, len(records),
                sum(len(r.get("annotations", ())) for r in records), time.perf_counter() - start)
    return records


def install_validating_loaders(cfg) -> list[str]:
    """Replace the DatasetCatalog loaders of ``cfg.DATASETS.TRAIN`` and ``TEST`` by validating ones; calling it again
    re-wraps the original loaders. Unregistered names are left for detectron2 to report. Returns the wrapped names."""
    train, test = [str(n) for n in cfg.DATASETS.TRAIN], [str(n) for n in cfg.DATASETS.TEST]
    model = cfg.MODEL.get("DiffusionInst")
    num_classes = int(model.NUM_CLASSES) if model is not None and "NUM_CLASSES" in model else None
    checked_tests: set = set()
    wrapped = []
    for name in dict.fromkeys(train + test):
        if name not in DatasetCatalog.list():
            continue
        original = getattr(DatasetCatalog[name], _ORIGINAL, DatasetCatalog[name])
        options = ValidationOptions(num_classes, bool(cfg.DATASETS.get("SKIP_INVALID", False)),
                                    bool(cfg.DATASETS.get("CHECK_IMAGE_FILES", True)), is_train=name in train)

        def load(name=name, original=original, options=options):
            records = load_validated(name, original, options)
            if options.is_train:  # a broken test set fails now, not at the first evaluation
                for test_name in test:
                    if test_name not in train and test_name not in checked_tests and test_name in DatasetCatalog.list():
                        DatasetCatalog.get(test_name)
                        checked_tests.add(test_name)
            return records

        setattr(load, _ORIGINAL, original)
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, load)
        wrapped.append(name)
    return wrapped
