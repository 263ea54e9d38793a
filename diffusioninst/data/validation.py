"""Dataset validation: clear errors for bad dataset input before training starts, or a documented repair.

``register_datasets_from_cfg`` wraps the loaders of the datasets named in ``DATASETS.TRAIN`` and ``DATASETS.TEST``
(:func:`install_validating_loaders`), so the checks run when a dataset is first loaded (building the train loader,
before iteration 0). Loading a training dataset also loads and checks the test datasets, so a broken validation
set fails before training rather than at the first evaluation.

Policy (``DATASETS.SKIP_INVALID`` off / on):

* the annotation file: missing, empty, not JSON, not a COCO object (no "images" / "categories", or no
  "annotations" in a training set), malformed entries, duplicate ids, no images, a training set without a single
  usable annotation: always an error naming the file and the entry;
* ``MODEL.DiffusionInst.NUM_CLASSES`` different from the dataset's number of categories, or a category id outside
  it: always an error naming the dataset and both numbers;
* an image file listed but missing on disk (one ``os.path.isfile`` per image at load, ~1 s for COCO's 118k
  files; ``DATASETS.CHECK_IMAGE_FILES False`` turns it off): error / the image is dropped with a warning.
  None of the listed files present is an error either way (``image_root`` is probably wrong);
* an annotation whose ``image_id`` is not in "images" or whose ``category_id`` is not in "categories":
  error / the annotation is dropped with a warning;
* an unusable annotation (no segmentation, bbox not 4 finite numbers, zero or negative width/height, bbox
  outside the image, no valid polygon, RLE of another size than the image): dropped with a warning naming the
  file and the annotation id, whatever the switch (the mapper would drop most of them silently, or crash);
* an invalid polygon (fewer than 3 points, odd coordinate count, NaN/inf): that polygon is dropped with a
  warning (as detectron2's ``load_coco_json`` does, which counts them but names none); the annotation is dropped
  when no polygon is left;
* an unreadable or truncated image is found by the mapper at train time (decoding every image at load is too
  slow): error naming the file / in training, skipped with a warning and another image used. At inference it is
  always an error (skipping would evaluate a different image in its place).

Warnings are logged on the ``diffusioninst.data.validation`` logger: the first ``MAX_LOGGED`` per dataset, then
a count by kind.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from ..errors import UserError

__all__ = [
    "DatasetFileNotFoundError",
    "DatasetValidationError",
    "ValidationOptions",
    "install_validating_loaders",
    "load_coco_instances",
    "validate_records",
]

logger = logging.getLogger(__name__)

MAX_LOGGED = 10  # individual warnings logged per dataset; the rest are counted
SKIP_KEY = "DATASETS.SKIP_INVALID"
CHECK_FILES_KEY = "DATASETS.CHECK_IMAGE_FILES"
NUM_CLASSES_KEY = "MODEL.DiffusionInst.NUM_CLASSES"
_SKIP_HINT = f"or set {SKIP_KEY} True to drop them with a warning"
_EXIF_ORIENTATION = 0x0112


class DatasetValidationError(UserError, ValueError):
    """A dataset cannot be used as it is; the message names the dataset, the file and the entry at fault."""


class DatasetFileNotFoundError(UserError, FileNotFoundError):
    """An annotation file or the image files of a dataset are not where the dataset says."""


@dataclass(frozen=True)
class ValidationOptions:
    """What a validating loader checks and how it reacts (see the module docstring for the policy)."""

    num_classes: int | None = None  # MODEL.DiffusionInst.NUM_CLASSES; None: not checked
    skip_invalid: bool = False  # DATASETS.SKIP_INVALID
    check_image_files: bool = True  # DATASETS.CHECK_IMAGE_FILES
    is_train: bool = True  # a training set must have annotations; a test set may be an image-info file


class _Problems:
    """Collects the repairs made to one dataset; logs the first MAX_LOGGED and then a summary."""

    def __init__(self, where: str):
        self.where = where
        self.counts: Counter = Counter()
        self.logged = 0

    def warn(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if self.logged < MAX_LOGGED:
            self.logged += 1
            logger.warning("%s: %s", self.where, message)

    def summary(self) -> None:
        total = sum(self.counts.values())
        if total > self.logged:
            kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())
            logger.warning("%s: %d problems in all (%s); only the first %d are shown above",
                           self.where, total, kinds, self.logged)


def _is_local(path: str) -> bool:
    return "://" not in str(path)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_id(x: Any) -> bool:
    return isinstance(x, (int, str, np.integer)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------------------
# Per-annotation checks, shared by the COCO loader and the record validation


def _bbox_problem(bbox: Any, bbox_mode: Any, height: Any, width: Any) -> str | None:
    """Why an annotation's box is unusable, or None. Boxes in modes other than XYWH/XYXY_ABS are not checked."""
    if not isinstance(bbox, (list, tuple, np.ndarray)) or len(bbox) != 4:
        return f"bbox {bbox!r} is not 4 numbers"
    try:
        finite = math.isfinite(float(sum(bbox)))  # strings and None raise; NaN and inf propagate
    except (TypeError, ValueError):
        return f"bbox {bbox!r} is not 4 numbers"
    if not finite:
        return f"bbox {bbox!r} has NaN or infinite values"
    values = [float(v) for v in bbox]
    if bbox_mode == BoxMode.XYWH_ABS:
        x0, y0, w, h = values
    elif bbox_mode == BoxMode.XYXY_ABS:
        x0, y0, w, h = values[0], values[1], values[2] - values[0], values[3] - values[1]
    else:
        return None
    if w <= 0 or h <= 0:
        return f"degenerate bbox {list(bbox)!r} (width {w:g}, height {h:g})"
    if _is_number(height) and _is_number(width) and (x0 >= width or y0 >= height or x0 + w <= 0 or y0 + h <= 0):
        return f"bbox {list(bbox)!r} lies outside the {width}x{height} image"
    return None


def _polygon_problem(poly: Any) -> str | None:
    if not isinstance(poly, (list, tuple, np.ndarray)):
        return f"is a {type(poly).__name__}, not a list of coordinates"
    n = len(poly)
    if n < 6 or n % 2:
        return f"has {n} coordinates (needs an even number, at least 6: 3 points)"
    try:
        total = float(sum(poly))  # one C-level pass: strings, None and nested lists raise; NaN and inf propagate
    except (TypeError, ValueError):
        return "has non-numeric coordinates"
    if not math.isfinite(total):
        return "has NaN or infinite coordinates"
    return None


def _clean_segmentation(segm: Any, height: Any, width: Any) -> tuple[Any, list[str], str | None]:
    """``(segmentation to keep, problems of dropped polygons, reason to drop the annotation or None)``."""
    if segm is None or (isinstance(segm, (list, tuple, dict)) and len(segm) == 0):
        return None, [], "has no segmentation (DiffusionInst trains on instance masks)"
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return None, [], "has an RLE segmentation without 'counts' and 'size'"
        size = list(segm["size"]) if isinstance(segm["size"], (list, tuple)) else segm["size"]
        if _is_number(height) and _is_number(width) and size != [height, width]:
            return None, [], f"has an RLE segmentation of size {size}, the image is [height, width] {[height, width]}"
        return segm, [], None
    if isinstance(segm, np.ndarray):
        if segm.ndim != 2 or (_is_number(height) and _is_number(width) and segm.shape != (height, width)):
            return None, [], f"has a mask of shape {segm.shape}, the image is {(height, width)}"
        return segm, [], None
    if not isinstance(segm, (list, tuple)):
        return None, [], f"has a segmentation of type {type(segm).__name__} (expected polygons, RLE or a mask)"
    kept, problems = [], []
    for k, poly in enumerate(segm):
        problem = _polygon_problem(poly)
        if problem is None:
            kept.append(poly)
        else:
            problems.append(f"polygon {k} {problem}")
    if not kept:
        return None, problems, "has no valid polygon"
    return (kept if problems else segm), problems, None


# ---------------------------------------------------------------------------------------------------------
# Image files


def _header_problem(path: str, height: Any, width: Any) -> str | None:
    """Why an image file cannot be used, from its header alone, or None: unreadable, or another size than declared
    (after EXIF orientation, as the mapper reads it)."""
    try:
        with Image.open(path) as image:
            w, h = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for files that are not images)
        return f"is not a readable image ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees when read
        w, h = h, w
    if _is_number(height) and _is_number(width) and (h, w) != (int(height), int(width)):
        return f"is {w}x{h} pixels but the dataset declares width {width}, height {height}"
    return None


def _bad_image_headers(entries: list[tuple[str, Any, Any]], where: str, options: ValidationOptions,
                       problems: _Problems) -> set[str]:
    """Check the headers of ``(path, height, width)`` image files (a few threads: this is I/O); return the paths
    to drop (with DATASETS.SKIP_INVALID, with a warning each), or raise naming the first bad file."""
    if not options.check_image_files or not entries:
        return set()
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = [(path, why) for (path, _, _), why in zip(entries, pool.map(lambda e: _header_problem(*e), entries))
                 if why is not None]
    if found and not options.skip_invalid:
        path, why = found[0]
        more = f" ({len(found)} images in all)" if len(found) > 1 else ""
        raise DatasetValidationError(
            f"{where}: image {path} {why}{more}; replace it or remove it from the dataset, {_SKIP_HINT} "
            f"(or {CHECK_FILES_KEY} False to skip these checks)")
    for path, why in found:
        problems.warn("unreadable images", f"image {path} {why}; image dropped")
    return {path for path, _ in found}


# ---------------------------------------------------------------------------------------------------------
# COCO json


def read_json(json_file: str, where: str) -> dict:
    """The annotation file's top-level JSON object; errors name ``where`` and say what is wrong with the file."""
    local = PathManager.get_local_path(json_file)
    if not os.path.isfile(local):
        note = "" if os.path.isabs(local) else (
            f" (relative to the working directory {os.getcwd()}; detectron2's builtin datasets are looked up under "
            "$DETECTRON2_DATASETS, default ./datasets)"
        )
        what = "is a directory, not a file" if os.path.isdir(local) else "not found"
        raise DatasetFileNotFoundError(f"{where}: annotation file {what}: {json_file}{note}")
    if os.path.getsize(local) == 0:
        raise DatasetValidationError(f"{where}: the annotation file is empty (0 bytes); was it written completely?")
    try:
        with open(local, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DatasetValidationError(
            f"{where}: the annotation file is not UTF-8 text ({e.reason} at byte {e.start}); is it a JSON file?"
        ) from e
    except json.JSONDecodeError as e:
        truncated = " (it ends early: a truncated download or copy?)" if e.pos >= len(e.doc.rstrip()) else ""
        raise DatasetValidationError(
            f"{where}: the annotation file is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{truncated}"
        ) from e
    if not isinstance(data, dict):
        hint = " (a list: a results/predictions file rather than an annotation file?)" if isinstance(data, list) else ""
        raise DatasetValidationError(
            f"{where}: expected a COCO JSON object with 'images', 'annotations' and 'categories', "
            f"found a JSON {type(data).__name__}{hint}"
        )
    return data


def _entry_list(data: dict, key: str, where: str, required: bool, why: str = "") -> list:
    if key not in data:
        if required:
            present = ", ".join(repr(k) for k in data) or "none"
            raise DatasetValidationError(
                f"{where}: not a COCO instances file: no {key!r} list{why} (top-level keys: {present})"
            )
        return []
    value = data[key]
    if not isinstance(value, list):
        raise DatasetValidationError(f"{where}: {key!r} must be a list, found a {type(value).__name__}")
    return value


def check_categories(categories: list, where: str) -> dict:
    """Category id -> name of a COCO/LVIS 'categories' list, which must be non-empty with unique integer ids."""
    if not categories:
        raise DatasetValidationError(f"{where}: 'categories' is empty; list the dataset's classes there")
    names = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), (int, np.integer)) or isinstance(
            cat.get("id"), bool
        ):
            raise DatasetValidationError(f"{where}: categories[{i}] {cat!r} has no integer 'id'")
        if not isinstance(cat.get("name"), str):
            raise DatasetValidationError(f"{where}: categories[{i}] (id {cat['id']}) has no 'name' string")
        if cat["id"] in names:
            raise DatasetValidationError(f"{where}: categories[{i}] repeats category id {cat['id']}")
        names[cat["id"]] = cat["name"]
    return names


def _check_images(images: list, where: str) -> dict:
    if not images:
        raise DatasetValidationError(f"{where}: 'images' is empty; the dataset has no images")
    by_id: dict = {}
    id_types = set()
    for i, img in enumerate(images):
        if not isinstance(img, dict):
            raise DatasetValidationError(f"{where}: images[{i}] is a {type(img).__name__}, not an object")
        if not _is_id(img.get("id")):
            raise DatasetValidationError(f"{where}: images[{i}] has no integer or string 'id': {img!r}"[:400])
        label = f"images[{i}] (id {img['id']!r})"
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DatasetValidationError(f"{where}: {label} has no 'file_name'")
        for key in ("height", "width"):
            v = img.get(key)
            if not _is_number(v) or not math.isfinite(v) or v <= 0 or v != int(v):
                raise DatasetValidationError(
                    f"{where}: {label} ({img['file_name']}) has no positive integer {key!r} (got {v!r})"
                )
        if img["id"] in by_id:
            raise DatasetValidationError(
                f"{where}: {label} ({img['file_name']}) repeats the id of {by_id[img['id']]['file_name']}"
            )
        id_types.add(type(img["id"]) is str)
        by_id[img["id"]] = img
    if len(id_types) > 1:
        raise DatasetValidationError(f"{where}: image ids mix integers and strings")
    return by_id


def load_coco_instances(
    json_file: str, image_root: str, dataset_name: str, options: ValidationOptions = ValidationOptions()
) -> list[dict]:
    """Load a COCO instances file into detectron2 dicts, checking it on the way.

    For valid data, returns what ``detectron2.data.datasets.load_coco_json(json_file, image_root, dataset_name)``
    returns and sets the same metadata (``thing_classes``, ``thing_dataset_id_to_contiguous_id``); invalid data
    raises or is repaired as the module docstring says. Parses the file once (like ``load_coco_json``).
    """
    where = f"dataset {dataset_name!r} ({json_file})"
    start = time.perf_counter()
    data = read_json(json_file, where)
    why_annotations = " (a training set needs instance annotations)"
    images = _entry_list(data, "images", where, True)
    annotations = _entry_list(data, "annotations", where, options.is_train, why_annotations)
    categories = _entry_list(data, "categories", where, True)
    class_names = check_categories(categories, where)
    images_by_id = _check_images(images, where)
    problems = _Problems(where)

    cat_ids = sorted(class_names)
    id_map = {v: i for i, v in enumerate(cat_ids)}
    meta = MetadataCatalog.get(dataset_name)
    meta.thing_classes = [class_names[i] for i in cat_ids]
    meta.thing_dataset_id_to_contiguous_id = id_map

    # Image files on disk.
    dropped_images: set = set()
    if options.check_image_files and _is_local(image_root):
        missing = [img for img in images if not os.path.isfile(os.path.join(image_root, img["file_name"]))]
        if missing:
            examples = ", ".join(os.path.join(image_root, img["file_name"]) for img in missing[:3])
            if len(missing) == len(images):
                raise DatasetFileNotFoundError(
                    f"{where}: none of the {len(images)} images it lists is under image_root {image_root} "
                    f"(e.g. {examples}); is image_root right?"
                )
            if not options.skip_invalid:
                raise DatasetFileNotFoundError(
                    f"{where}: {len(missing)} of the {len(images)} images it lists are missing on disk, e.g. "
                    f"{examples}; restore them or remove them from the file, {_SKIP_HINT} "
                    f"(or {CHECK_FILES_KEY} False to skip this check)"
                )
            for img in missing:
                dropped_images.add(img["id"])
                problems.warn("missing images", f"image file {os.path.join(image_root, img['file_name'])} "
                              f"(image id {img['id']!r}) is missing; image dropped")
        present = [img for img in images if img["id"] not in dropped_images]
        paths = {os.path.join(image_root, img["file_name"]): img["id"] for img in present}
        bad = _bad_image_headers([(os.path.join(image_root, img["file_name"]), img["height"], img["width"])
                                  for img in present], where, options, problems)
        dropped_images.update(paths[path] for path in bad)

    # Annotations: structure, references, geometry.
    check_unique = "minival" not in json_file  # detectron2's exemption: COCO 2014 minival repeats annotation ids
    seen_ids: dict = {}
    orphans, unknown_cats = [], []
    anns_by_image: dict = defaultdict(list)
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise DatasetValidationError(f"{where}: annotations[{i}] is a {type(ann).__name__}, not an object")
        for key in ("id", "image_id", "category_id"):
            if key not in ann:
                ident = f" (id {ann['id']!r})" if "id" in ann else ""
                raise DatasetValidationError(f"{where}: annotations[{i}]{ident} has no {key!r}")
        if check_unique:
            if ann["id"] in seen_ids:
                raise DatasetValidationError(
                    f"{where}: annotation id {ann['id']!r} is used twice (annotations[{seen_ids[ann['id']]}] "
                    f"and annotations[{i}]); annotation ids must be unique"
                )
            seen_ids[ann["id"]] = i
        if ann.get("ignore", 0) != 0:
            raise DatasetValidationError(
                f"{where}: annotation id {ann['id']!r} has \"ignore\": {ann['ignore']!r}, which is not supported "
                "(use \"iscrowd\": 1 for regions to ignore)"
            )
        if ann["image_id"] not in images_by_id:
            orphans.append(ann)
        elif ann["category_id"] not in id_map:
            unknown_cats.append(ann)
        elif ann["image_id"] not in dropped_images:
            anns_by_image[ann["image_id"]].append(ann)
    if orphans:
        ann = orphans[0]
        if not options.skip_invalid:
            raise DatasetValidationError(
                f"{where}: {len(orphans)} annotation(s) refer to image ids not in 'images', e.g. annotation id "
                f"{ann['id']!r} with image_id {ann['image_id']!r}; are 'images' and 'annotations' from the same "
                f"export? Fix the file, {_SKIP_HINT}"
            )
        for ann in orphans:
            problems.warn("annotations of unknown images", f"annotation id {ann['id']!r} refers to image_id "
                          f"{ann['image_id']!r}, which is not in 'images'; annotation dropped")
    if unknown_cats:
        ann = unknown_cats[0]
        if not options.skip_invalid:
            raise DatasetValidationError(
                f"{where}: {len(unknown_cats)} annotation(s) have a category_id not in 'categories' (ids "
                f"{cat_ids}), e.g. annotation id {ann['id']!r} of {images_by_id[ann['image_id']]['file_name']} "
                f"with category_id {ann['category_id']!r}; add the category or fix the annotations, {_SKIP_HINT}"
            )
        for ann in unknown_cats:
            problems.warn("annotations of unknown categories",
                          f"annotation id {ann['id']!r} of {images_by_id[ann['image_id']]['file_name']} has "
                          f"category_id {ann['category_id']!r}, not in 'categories'; annotation dropped")

    records = []
    num_kept = 0
    for image_id in sorted(images_by_id):
        if image_id in dropped_images:
            continue
        img = images_by_id[image_id]
        record = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "height": img["height"],
            "width": img["width"],
            "image_id": image_id,
        }
        objs = []
        for ann in anns_by_image.get(image_id, ()):
            obj = _coco_annotation_to_dict(ann, img, id_map, problems)
            if obj is not None:
                objs.append(obj)
        record["annotations"] = objs
        num_kept += sum(not obj.get("iscrowd", 0) for obj in objs)  # crowd regions are not instances
        records.append(record)
    problems.summary()
    if options.is_train and num_kept == 0:
        crowd = sum(bool(a.get("iscrowd", 0)) for a in annotations if isinstance(a, dict))
        detail = (f"all {len(annotations)} are crowd regions (iscrowd 1), which are ignored in training, not trained on"
                  if annotations and crowd == len(annotations) else
                  f"all {len(annotations)} were dropped (see the warnings above)" if annotations else "it has none")
        raise DatasetValidationError(f"{where}: no usable instance annotation: {detail}")
    logger.info("%s: %d images, %d annotations checked in %.1f s", where, len(records), num_kept,
                time.perf_counter() - start)
    return records


def _coco_annotation_to_dict(ann: dict, img: dict, id_map: dict, problems: _Problems) -> dict | None:
    """One annotation as load_coco_json makes it, or None (with a warning) when it is unusable."""
    label = f"annotation id {ann['id']!r} of {img['file_name']}"
    reason = _bbox_problem(ann.get("bbox"), BoxMode.XYWH_ABS, img["height"], img["width"]) if "bbox" in ann else (
        "has no bbox")
    segm, polygon_problems, segm_reason = _clean_segmentation(ann.get("segmentation"), img["height"], img["width"])
    reason = reason or segm_reason
    if reason is not None:
        details = "; ".join(polygon_problems)
        problems.warn("unusable annotations", f"{label}: {reason}{' (' + details + ')' if details else ''}; "
                      "annotation dropped")
        return None
    for problem in polygon_problems:
        problems.warn("invalid polygons", f"{label}: {problem}; polygon dropped")
    obj = {key: ann[key] for key in ("iscrowd", "bbox", "keypoints", "category_id") if key in ann}
    if isinstance(segm, dict) and isinstance(segm["counts"], list):
        segm = mask_util.frPyObjects(segm, *segm["size"])
    obj["segmentation"] = segm
    keypoints = ann.get("keypoints")
    if keypoints:  # pixel indices -> coordinates, as load_coco_json does
        obj["keypoints"] = [v + 0.5 if idx % 3 != 2 else v for idx, v in enumerate(keypoints)]
    obj["bbox_mode"] = BoxMode.XYWH_ABS
    obj["category_id"] = id_map[ann["category_id"]]
    return obj


# ---------------------------------------------------------------------------------------------------------
# Records from any loader


def validate_records(records: Any, dataset_name: str, options: ValidationOptions = ValidationOptions()) -> list[dict]:
    """Check detectron2 dicts from any loader (LVIS, a Python function); return them with repairs applied.

    Records are not modified: a repaired record is a shallow copy with a new ``annotations`` list.
    """
    where = f"dataset {dataset_name!r}"
    if not isinstance(records, list):
        raise DatasetValidationError(f"{where}: the registered loader returned a {type(records).__name__}, not a list")
    if not records:
        raise DatasetValidationError(f"{where}: the dataset is empty (its loader returned no images)")
    problems = _Problems(where)
    num_classes = options.num_classes
    out, missing = [], []
    num_kept = 0
    for r, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise DatasetValidationError(f"{where}: record {r} has no 'file_name': {record!r}"[:400])
        file_name = record["file_name"]
        if options.check_image_files and _is_local(file_name) and not os.path.isfile(file_name):
            missing.append(file_name)
            continue
        annotations = record.get("annotations", [])
        kept = []
        for j, obj in enumerate(annotations):
            label = f"annotation {j}{' (id ' + repr(obj['id']) + ')' if 'id' in obj else ''} of {file_name}"
            category = obj.get("category_id")
            if not isinstance(category, (int, np.integer)) or category < 0 or (
                num_classes is not None and category >= num_classes
            ):
                bound = f"[0, {num_classes}) ({NUM_CLASSES_KEY})" if num_classes is not None else "non-negative"
                message = f"{label} has category id {category!r}, outside {bound}"
                if not options.skip_invalid:
                    raise DatasetValidationError(f"{where}: {message}; fix the dataset or the config, {_SKIP_HINT}")
                problems.warn("annotations of unknown categories", f"{message}; annotation dropped")
                continue
            reason = _bbox_problem(obj.get("bbox"), obj.get("bbox_mode", BoxMode.XYWH_ABS), record.get("height"),
                                   record.get("width")) if "bbox" in obj else "has no bbox"
            segm, polygon_problems, segm_reason = _clean_segmentation(
                obj.get("segmentation"), record.get("height"), record.get("width")
            )
            if obj.get("iscrowd", 0):  # the mapper drops crowd regions: nothing to check
                reason = segm_reason = None
                polygon_problems, segm = [], obj.get("segmentation")
            reason = reason or segm_reason
            if reason is not None:
                problems.warn("unusable annotations", f"{label}: {reason}; annotation dropped")
                continue
            for problem in polygon_problems:
                problems.warn("invalid polygons", f"{label}: {problem}; polygon dropped")
            kept.append({**obj, "segmentation": segm} if polygon_problems else obj)
        num_kept += sum(not obj.get("iscrowd", 0) for obj in kept)  # crowd regions are not instances
        out.append(record if len(kept) == len(annotations) else {**record, "annotations": kept})
    if missing:
        examples = ", ".join(missing[:3])
        if len(missing) == len(records):
            raise DatasetFileNotFoundError(f"{where}: none of its {len(records)} image files exists (e.g. {examples})")
        if not options.skip_invalid:
            raise DatasetFileNotFoundError(
                f"{where}: {len(missing)} of its {len(records)} image files are missing, e.g. {examples}; restore "
                f"them, {_SKIP_HINT} (or {CHECK_FILES_KEY} False to skip this check)"
            )
        for file_name in missing:
            problems.warn("missing images", f"image file {file_name} is missing; image dropped")
    local = [(r["file_name"], r.get("height"), r.get("width")) for r in out if _is_local(r["file_name"])]
    bad = _bad_image_headers(local, where, options, problems)
    if bad:
        out = [r for r in out if r["file_name"] not in bad]
    problems.summary()
    if options.is_train and num_kept == 0:
        raise DatasetValidationError(f"{where}: no usable instance annotation (crowd regions are not instances) in "
                                     f"{len(records)} images")
    return out


def check_num_classes(dataset_name: str, options: ValidationOptions) -> None:
    """NUM_CLASSES must equal the dataset's number of categories (its metadata's ``thing_classes``)."""
    classes = MetadataCatalog.get(dataset_name).get("thing_classes")
    if options.num_classes is None or classes is None or len(classes) == options.num_classes:
        return
    source = MetadataCatalog.get(dataset_name).get("json_file")
    raise DatasetValidationError(
        f"dataset {dataset_name!r}{' (' + source + ')' if source else ''} has {len(classes)} categories but "
        f"{NUM_CLASSES_KEY} is {options.num_classes}; set {NUM_CLASSES_KEY} {len(classes)} (in the config or on "
        "the command line), or fix the dataset's categories"
    )


# ---------------------------------------------------------------------------------------------------------
# Installing the checks in the DatasetCatalog

_ORIGINAL = "_diffusioninst_original_loader"
# Set on a loader function (by the project's own registrations) to (json_file, image_root, prepare): the loader
# reads that COCO file after calling prepare() (e.g. generating the file), so the checked loader can replace it.
COCO_SOURCE = "_diffusioninst_coco_source"


def _coco_source(name: str, loader: Callable) -> tuple[str, str, Callable[[], None] | None] | None:
    source = getattr(loader, COCO_SOURCE, None)
    if source is not None:
        return source
    # detectron2's register_coco_instances (also behind its builtin COCO datasets): load_coco_json(json, root, name).
    if getattr(loader, "__qualname__", "") == "register_coco_instances.<locals>.<lambda>" and getattr(
        loader, "__module__", ""
    ).startswith("detectron2.data.datasets"):
        meta = MetadataCatalog.get(name)
        if meta.get("json_file") and meta.get("image_root"):
            return meta.json_file, meta.image_root, None
    return None


def load_validated(name: str, loader: Callable[[], Any], options: ValidationOptions) -> list[dict]:
    """Load dataset ``name`` (whose registered loader is ``loader``) with the checks of ``options``."""
    source = _coco_source(name, loader)
    meta = MetadataCatalog.get(name)
    if source is not None:
        json_file, image_root, prepare = source
        if prepare is not None:
            prepare()
        records = load_coco_instances(json_file, image_root, name, options)
    else:
        try:
            loaded = loader()
        except FileNotFoundError:
            json_file = meta.get("json_file")
            if json_file and _is_local(json_file) and not os.path.isfile(json_file):
                read_json(json_file, f"dataset {name!r}")  # raises the message that says where the file is looked for
            raise
        records = validate_records(loaded, name, options)
    check_num_classes(name, options)
    if options.is_train and meta.get("class_image_count") is None and options.num_classes is not None:
        meta.class_image_count = _class_image_count(records, options.num_classes)  # for the federated loss
    return records


def _class_image_count(records: list[dict], num_classes: int) -> list[dict]:
    """``[{"id": k + 1, "image_count": images with class k}, ...]`` of checked records (non-crowd instances)."""
    counts = [0] * num_classes
    for record in records:
        for k in {a["category_id"] for a in record.get("annotations", ()) if not a.get("iscrowd", 0)}:
            counts[k] += 1
    return [{"id": k + 1, "image_count": n} for k, n in enumerate(counts)]


def install_validating_loaders(cfg) -> list[str]:
    """Replace the DatasetCatalog loaders of ``cfg.DATASETS.TRAIN`` and ``TEST`` by validating ones.

    Calling it again (with another config) re-wraps the original loaders. Names that are not registered are left
    for detectron2 to report when they are used. Returns the wrapped names.
    """
    train = [str(n) for n in cfg.DATASETS.TRAIN]
    test = [str(n) for n in cfg.DATASETS.TEST]
    model = cfg.MODEL.get("DiffusionInst")
    num_classes = int(model.NUM_CLASSES) if model is not None and "NUM_CLASSES" in model else None
    skip_invalid = bool(cfg.DATASETS.get("SKIP_INVALID", False))
    check_files = bool(cfg.DATASETS.get("CHECK_IMAGE_FILES", True))
    checked_tests: set = set()
    wrapped = []
    for name in dict.fromkeys(train + test):
        if name not in DatasetCatalog.list():
            continue
        current = DatasetCatalog[name]
        original = getattr(current, _ORIGINAL, current)
        options = ValidationOptions(num_classes, skip_invalid, check_files, is_train=name in train)

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


# ---------------------------------------------------------------------------------------------------------
# detectron2 v0.6's MapDataset retry on Python >= 3.11


def patch_map_dataset_retry() -> bool:
    """Make ``MapDataset`` retry another index when the mapper returns None, on Python >= 3.11.

    detectron2 v0.6 picks the retry with ``random.sample(a_set, k=1)``, which Python 3.11 rejects with a
    TypeError, so a mapper that skips a sample (``DATASETS.SKIP_INVALID``) would crash the loader. Applied only
    when that call is in the installed MapDataset and sets are rejected. Returns whether it patched.
    """
    from detectron2.data import common

    cls = common.MapDataset
    if getattr(cls.__getitem__, "_diffusioninst_patched", False):
        return False
    try:
        random.Random(0).sample({0}, 1)
        return False
    except TypeError:
        pass
    try:
        source = inspect.getsource(cls.__getitem__)
    except (OSError, TypeError):
        return False
    if "sample(self._fallback_candidates" not in source:
        return False

    def __getitem__(self, idx):
        retry_count = 0
        cur_idx = int(idx)
        while True:
            data = self._map_func(self._dataset[cur_idx])
            if data is not None:
                self._fallback_candidates.add(cur_idx)
                return data
            retry_count += 1
            self._fallback_candidates.discard(cur_idx)
            if not self._fallback_candidates:
                raise RuntimeError("the dataset mapper returned None (skipped) for every element of the dataset")
            cur_idx = self._rng.choice(sorted(self._fallback_candidates))
            if retry_count >= 3:
                logging.getLogger(common.__name__).warning(
                    "Failed to apply `_map_func` for idx: %s, retry count: %s", idx, retry_count
                )

    __getitem__._diffusioninst_patched = True
    cls.__getitem__ = __getitem__
    return True

