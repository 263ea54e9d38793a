"""Checks of dataset input on top of detectron2's loaders: an error naming the dataset, the file and the entry, or a
documented repair. A COCO file has its JSON checked, then is read by detectron2's ``load_coco_json`` (from a repaired
copy when entries were dropped); records of any other loader (LVIS, Python) are checked as they come. Policy, with
``DATASETS.SKIP_INVALID`` off / on:

* a malformed annotation file (missing, empty, not JSON, not COCO, bad entries, duplicate ids) and a training set
  without one usable instance (crowd regions are not instances): always an error;
* annotations of unlisted images or categories, and image files (``DATASETS.CHECK_IMAGE_FILES``) that are missing,
  unreadable or of another size than declared: error / dropped with a warning (none present: always an error);
* unusable annotations (no segmentation, bad box, no valid polygon, RLE of another size) and invalid polygons:
  dropped with a warning naming the annotation, whatever the switch.

Warnings go to this module's logger: the first ``MAX_LOGGED`` per dataset, then a count by kind.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from PIL import Image

from ..errors import UserError

__all__ = ["DatasetFileNotFoundError", "DatasetValidationError", "ValidationOptions", "check_categories",
           "load_coco_checked", "read_json", "validate_records"]

logger = logging.getLogger(__name__)

MAX_LOGGED = 10  # individual warnings logged per dataset; the rest are counted
SKIP_KEY, CHECK_FILES_KEY = "DATASETS.SKIP_INVALID", "DATASETS.CHECK_IMAGE_FILES"
NUM_CLASSES_KEY = "MODEL.DiffusionInst.NUM_CLASSES"
_SKIP_HINT = f"or set {SKIP_KEY} True to drop them with a warning"


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
        self.where, self.counts, self.logged = where, Counter(), 0

    def warn(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if self.logged < MAX_LOGGED:
            self.logged += 1
            logger.warning("%s: %s", self.where, message)

    def summary(self) -> None:
        total = sum(self.counts.values())
        if total > self.logged:
            kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())
            logger.warning("%s: %d problems in all (%s); only the first %d are shown above", self.where, total, kinds,
                           self.logged)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------------------
# One annotation (COCO JSON entries and records of any loader)


def _bbox_problem(bbox: Any, mode: Any, height: Any, width: Any) -> str | None:
    """Why a box is unusable, or None. Boxes in modes other than XYWH/XYXY_ABS are not checked."""
    try:
        finite = len(bbox) == 4 and math.isfinite(float(sum(bbox)))  # strings and None raise; NaN/inf propagate
    except (TypeError, ValueError):
        return f"bbox {bbox!r} is not 4 numbers"
    if len(bbox) != 4:
        return f"bbox {bbox!r} is not 4 numbers"
    if not finite:
        return f"bbox {bbox!r} has NaN or infinite values"
    x0, y0, a, b = (float(v) for v in bbox)
    if mode not in (BoxMode.XYWH_ABS, BoxMode.XYXY_ABS):
        return None
    w, h = (a, b) if mode == BoxMode.XYWH_ABS else (a - x0, b - y0)
    if w <= 0 or h <= 0:
        return f"degenerate bbox {list(bbox)!r} (width {w:g}, height {h:g})"
    if _is_number(height) and _is_number(width) and (x0 >= width or y0 >= height or x0 + w <= 0 or y0 + h <= 0):
        return f"bbox {list(bbox)!r} lies outside the {width}x{height} image"
    return None


def _polygon_problem(poly: Any) -> str | None:
    if not isinstance(poly, (list, tuple, np.ndarray)):
        return f"is a {type(poly).__name__}, not a list of coordinates"
    if len(poly) < 6 or len(poly) % 2:
        return f"has {len(poly)} coordinates (needs an even number, at least 6: 3 points)"
    try:
        total = float(sum(poly))  # one C-level pass: strings, None and nested lists raise; NaN and inf propagate
    except (TypeError, ValueError):
        return "has non-numeric coordinates"
    return None if math.isfinite(total) else "has NaN or infinite coordinates"


def _clean_segmentation(segm: Any, height: Any, width: Any) -> tuple[Any, list[str], str | None]:
    """``(segmentation to keep, problems of dropped polygons, reason to drop the annotation or None)``."""
    if segm is None or (isinstance(segm, (list, tuple, dict)) and len(segm) == 0):
        return None, [], "has no segmentation (DiffusionInst trains on instance masks)"
    sized = _is_number(height) and _is_number(width)
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return None, [], "has an RLE segmentation without 'counts' and 'size'"
        size = list(segm["size"]) if isinstance(segm["size"], (list, tuple)) else segm["size"]
        if sized and size != [height, width]:
            return None, [], f"has an RLE segmentation of size {size}, the image is [height, width] {[height, width]}"
        return segm, [], None
    if isinstance(segm, np.ndarray):
        ok = segm.ndim == 2 and (not sized or segm.shape == (height, width))
        why = None if ok else f"has a mask of shape {segm.shape}, the image is {(height, width)}"
        return (segm if ok else None), [], why
    if not isinstance(segm, (list, tuple)):
        return None, [], f"has a segmentation of type {type(segm).__name__} (expected polygons, RLE or a mask)"
    problems = [f"polygon {k} {why}" for k, poly in enumerate(segm) if (why := _polygon_problem(poly))]
    kept = [poly for poly in segm if _polygon_problem(poly) is None]
    if not kept:
        return None, problems, "has no valid polygon"
    return (kept if problems else segm), problems, None


def _check_annotation(obj: dict, mode: Any, height: Any, width: Any, label: str, problems: _Problems) -> dict | None:
    """The annotation to keep (its invalid polygons dropped), or None when it is unusable; warnings name ``label``.
    Crowd regions are ignored in training, not trained on: only their presence matters."""
    if obj.get("iscrowd", 0):
        return obj
    reason = _bbox_problem(obj["bbox"], mode, height, width) if "bbox" in obj else "has no bbox"
    segm, polygon_problems, segm_reason = _clean_segmentation(obj.get("segmentation"), height, width)
    if reason or segm_reason:
        details = "; ".join(polygon_problems)
        problems.warn("unusable annotations", f"{label}: {reason or segm_reason}"
                      f"{' (' + details + ')' if details and not reason else ''}; annotation dropped")
        return None
    for problem in polygon_problems:
        problems.warn("invalid polygons", f"{label}: {problem}; polygon dropped")
    return {**obj, "segmentation": segm} if polygon_problems else obj


# ---------------------------------------------------------------------------------------------------------
# Image files


def _header_problem(path: str, height: Any, width: Any) -> str | None:
    """Why an image file cannot be used, from its header alone: missing, unreadable, or another size than declared
    (after EXIF orientation, as the mapper reads it)."""
    if not os.path.isfile(path):
        return "is missing"
    try:
        with Image.open(path) as image:
            w, h = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for files that are not images)
        return f"is not a readable image ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    w, h = (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # rotated by 90 degrees when read
    if _is_number(height) and _is_number(width) and (h, w) != (int(height), int(width)):
        return f"is {w}x{h} pixels but the dataset declares width {width}, height {height}"
    return None


def _check_image_files(images: list[tuple[str, Any, Any, str]], where: str, options: ValidationOptions,
                       problems: _Problems, image_root: str | None = None) -> set[str]:
    """Check ``(path, height, width, label)`` image files (headers read in a few threads: this is I/O); return the
    paths to drop (with DATASETS.SKIP_INVALID), or raise naming the first bad file."""
    images = [img for img in images if "://" not in img[0]]
    if not options.check_image_files or not images:
        return set()
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = [(img, why) for img, why in zip(images, pool.map(lambda i: _header_problem(*i[:3]), images)) if why]
    missing = [img[0] for img, why in found if why == "is missing"]
    if missing and len(missing) == len(images):
        within = f" is under image_root {image_root}" if image_root else " exists"
        raise DatasetFileNotFoundError(f"{where}: none of the {len(images)} images it lists{within} (e.g. "
                                       f"{', '.join(missing[:3])}); is image_root right?")
    if missing and not options.skip_invalid:
        raise DatasetFileNotFoundError(
            f"{where}: {len(missing)} of the {len(images)} images it lists are missing on disk, e.g. "
            f"{', '.join(missing[:3])}; restore them or remove them from the dataset, {_SKIP_HINT} (or "
            f"{CHECK_FILES_KEY} False to skip this check)")
    if found and not options.skip_invalid:
        (path, *_), why = found[0]
        more = f" ({len(found)} images in all)" if len(found) > 1 else ""
        raise DatasetValidationError(f"{where}: image {path} {why}{more}; replace it or remove it from the dataset, "
                                     f"{_SKIP_HINT} (or {CHECK_FILES_KEY} False to skip these checks)")
    for (path, _, _, label), why in found:
        problems.warn("unusable images", f"image file {path}{label} {why}; image dropped")
    return {img[0] for img, _ in found}


# ---------------------------------------------------------------------------------------------------------
# COCO JSON, then detectron2's load_coco_json


def read_json(json_file: str, where: str) -> dict:
    """The annotation file's top-level JSON object; errors name ``where`` and say what is wrong with the file."""
    local = PathManager.get_local_path(json_file)
    if not os.path.isfile(local):
        note = "" if os.path.isabs(local) else (
            f" (relative to the working directory {os.getcwd()}; detectron2's builtin datasets are looked up under "
            "$DETECTRON2_DATASETS, default ./datasets)")
        what = "is a directory, not a file" if os.path.isdir(local) else "not found"
        raise DatasetFileNotFoundError(f"{where}: annotation file {what}: {json_file}{note}")
    if os.path.getsize(local) == 0:
        raise DatasetValidationError(f"{where}: the annotation file is empty (0 bytes); was it written completely?")
    try:
        with open(local, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DatasetValidationError(f"{where}: the annotation file is not UTF-8 text ({e.reason} at byte "
                                     f"{e.start}); is it a JSON file?") from e
    except json.JSONDecodeError as e:
        cut = " (it ends early: a truncated download or copy?)" if e.pos >= len(e.doc.rstrip()) else ""
        raise DatasetValidationError(f"{where}: the annotation file is not valid JSON: {e.msg} at line {e.lineno} "
                                     f"column {e.colno}{cut}") from e
    if not isinstance(data, dict):
        hint = " (a list: a results/predictions file rather than an annotation file?)" if isinstance(data, list) else ""
        raise DatasetValidationError(f"{where}: expected a COCO JSON object with 'images', 'annotations' and "
                                     f"'categories', found a JSON {type(data).__name__}{hint}")
    return data


def _positive_int(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v) and v > 0 and v == int(v)


# What each entry of a COCO file must hold: key -> (test, what the message says is missing).
_FIELDS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "images": {"id": (lambda v: isinstance(v, (int, str, np.integer)) and not isinstance(v, bool), "integer or "
                      "string 'id'"), "file_name": (lambda v: isinstance(v, str) and bool(v), "'file_name'"),
               "height": (_positive_int, "positive integer 'height'"),
               "width": (_positive_int, "positive integer 'width'")},
    "categories": {"id": (lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool), "integer 'id'"),
                   "name": (lambda v: isinstance(v, str), "'name' string")},
    "annotations": {key: (lambda v: v is not None, repr(key)) for key in ("id", "image_id", "category_id")},
}


def _check_entries(data: dict, kind: str, where: str, required: bool = True, why: str = "",
                   unique: bool = True) -> list:
    """The ``kind`` entries of a COCO file, each checked against :data:`_FIELDS` (ids unique if ``unique``)."""
    if kind not in data:
        if required:
            present = ", ".join(repr(k) for k in data) or "none"
            raise DatasetValidationError(f"{where}: not a COCO instances file: no {kind!r} list{why} (top-level keys: "
                                         f"{present})")
        return []
    if not isinstance(data[kind], list):
        raise DatasetValidationError(f"{where}: {kind!r} must be a list, found a {type(data[kind]).__name__}")
    if not data[kind] and kind != "annotations":
        raise DatasetValidationError(f"{where}: {kind!r} is empty; the dataset has no {kind}")
    by_id: dict = {}
    for i, entry in enumerate(data[kind]):
        if not isinstance(entry, dict):
            raise DatasetValidationError(f"{where}: {kind}[{i}] is a {type(entry).__name__}, not an object")
        label = f"{kind}[{i}]{' (id ' + repr(entry['id']) + ')' if 'id' in entry else ''}"
        label += f" ({entry['file_name']})" if kind == "images" and isinstance(entry.get("file_name"), str) else ""
        for key, (test, what) in _FIELDS[kind].items():
            if not test(entry.get(key)):
                raise DatasetValidationError(f"{where}: {label} has no {what} (got {entry.get(key)!r})"[:500])
        if unique and entry["id"] in by_id:
            j = next(k for k, e in enumerate(data[kind]) if e is by_id[entry["id"]])
            raise DatasetValidationError(f"{where}: {label} repeats the id of {kind}[{j}]: {kind[:-1]} id "
                                         f"{entry['id']!r} is used twice ({kind}[{j}] and {kind}[{i}]); ids must be "
                                         "unique")
        by_id[entry["id"]] = entry
    if kind == "images" and len({type(i) is str for i in by_id}) > 1:
        raise DatasetValidationError(f"{where}: image ids mix integers and strings")
    return data[kind]


def check_categories(categories: list, where: str) -> dict:
    """Category id -> name of a COCO/LVIS 'categories' list, which must be non-empty with unique integer ids."""
    return {c["id"]: c["name"] for c in _check_entries({"categories": categories}, "categories", where)}


def _check_references(annotations: list, images: dict, categories: dict, where: str, options: ValidationOptions,
                      problems: _Problems) -> list:
    """Annotations without those of unknown images or categories, which are refused (or dropped with a warning)."""
    for ann in annotations:
        if ann.get("ignore", 0) != 0:
            raise DatasetValidationError(f"{where}: annotation id {ann['id']!r} has \"ignore\": {ann['ignore']!r}, "
                                         "which is not supported (use \"iscrowd\": 1 for regions to ignore)")
    orphans = [a for a in annotations if a["image_id"] not in images]
    unknown = [a for a in annotations if a["image_id"] in images and a["category_id"] not in categories]
    if orphans and not options.skip_invalid:
        raise DatasetValidationError(
            f"{where}: {len(orphans)} annotation(s) refer to image ids not in 'images', e.g. annotation id "
            f"{orphans[0]['id']!r} with image_id {orphans[0]['image_id']!r}; are 'images' and 'annotations' from the "
            f"same export? Fix the file, {_SKIP_HINT}")
    if unknown and not options.skip_invalid:
        ann = unknown[0]
        raise DatasetValidationError(
            f"{where}: {len(unknown)} annotation(s) have a category_id not in 'categories' (ids {sorted(categories)}), "
            f"e.g. annotation id {ann['id']!r} of {images[ann['image_id']]['file_name']} with category_id "
            f"{ann['category_id']!r}; add the category or fix the annotations, {_SKIP_HINT}")
    for ann in orphans:
        problems.warn("annotations of unknown images", f"annotation id {ann['id']!r} refers to image_id "
                      f"{ann['image_id']!r}, which is not in 'images'; annotation dropped")
    for ann in unknown:
        problems.warn("annotations of unknown categories", f"annotation id {ann['id']!r} of "
                      f"{images[ann['image_id']]['file_name']} has category_id {ann['category_id']!r}, not in "
                      "'categories'; annotation dropped")
    dropped = {id(a) for a in orphans + unknown}
    return [a for a in annotations if id(a) not in dropped]


def load_coco_checked(json_file: str, image_root: str, dataset_name: str,
                      options: ValidationOptions = ValidationOptions()) -> list[dict]:
    """Check a COCO instances file (and its images), then read it with detectron2's ``load_coco_json``: for valid data
    the same records and metadata; bad entries raise or are dropped as the module docstring says."""
    where = f"dataset {dataset_name!r} ({json_file})"
    data = read_json(json_file, where)
    images = {img["id"]: img for img in _check_entries(data, "images", where)}
    annotations = _check_entries(data, "annotations", where, options.is_train, " (a training set needs instance "
                                 "annotations)", unique="minival" not in json_file)  # detectron2 exempts 2014 minival
    categories = {c["id"]: c for c in _check_entries(data, "categories", where)}
    problems = _Problems(where)
    kept = _check_references(annotations, images, categories, where, options, problems)
    bad_files = _check_image_files([(os.path.join(image_root, img["file_name"]), img["height"], img["width"],
                                     f" (image id {img['id']!r})") for img in images.values()],
                                   where, options, problems, image_root)
    usable = []
    for ann in kept:
        img = images[ann["image_id"]]
        if os.path.join(image_root, img["file_name"]) not in bad_files:
            obj = _check_annotation(ann, BoxMode.XYWH_ABS, img["height"], img["width"],
                                    f"annotation id {ann['id']!r} of {img['file_name']}", problems)
            usable += [obj] if obj is not None else []
    problems.summary()
    _require_instances(usable, len(annotations), where, options)
    if len(usable) == len(annotations) and not bad_files and all(a is b for a, b in zip(usable, annotations)):
        return load_coco_json(json_file, image_root, dataset_name)
    kept_images = [img for img in images.values() if os.path.join(image_root, img["file_name"]) not in bad_files]
    repaired = {**data, "annotations": usable, "images": kept_images}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:  # load_coco_json reads a file
        json.dump(repaired, f)
    try:
        return load_coco_json(f.name, image_root, dataset_name)
    finally:
        os.remove(f.name)


def _require_instances(annotations: list, total: int, where: str, options: ValidationOptions) -> None:
    """A training set needs one usable instance; crowd regions are ignored in training, not trained on."""
    if not options.is_train or any(not a.get("iscrowd", 0) for a in annotations):
        return
    if total and len(annotations) == total:
        detail = f"all {total} are crowd regions (iscrowd 1): crowd regions are not instances, training ignores them"
    else:
        detail = f"all {total} were dropped (see the warnings above)" if total else "it has none"
    raise DatasetValidationError(f"{where}: no usable instance annotation: {detail}")


# ---------------------------------------------------------------------------------------------------------
# Records from any loader


def validate_records(records: Any, dataset_name: str, options: ValidationOptions = ValidationOptions()) -> list[dict]:
    """Check detectron2 dicts from any loader (LVIS, a Python function); return them with repairs applied (a repaired
    record is a shallow copy with a new ``annotations`` list; the input is not modified)."""
    where = f"dataset {dataset_name!r}"
    if not isinstance(records, list) or not records:
        what = "returned no images" if isinstance(records, list) else f"returned a {type(records).__name__}, not a list"
        raise DatasetValidationError(f"{where}: the registered loader {what}")
    problems, num_classes, out = _Problems(where), options.num_classes, []
    for r, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise DatasetValidationError(f"{where}: record {r} has no 'file_name': {record!r}"[:400])
        kept = []
        for j, obj in enumerate(record.get("annotations", [])):
            label = f"annotation {j}{' (id ' + repr(obj['id']) + ')' if 'id' in obj else ''} of {record['file_name']}"
            category = obj.get("category_id")
            if not isinstance(category, (int, np.integer)) or category < 0 or (num_classes and category >= num_classes):
                bound = f"[0, {num_classes}) ({NUM_CLASSES_KEY})" if num_classes is not None else "non-negative"
                message = f"{label} has category id {category!r}, outside {bound}"
                if not options.skip_invalid:
                    raise DatasetValidationError(f"{where}: {message}; fix the dataset or the config, {_SKIP_HINT}")
                problems.warn("annotations of unknown categories", f"{message}; annotation dropped")
                continue
            obj = _check_annotation(obj, obj.get("bbox_mode", BoxMode.XYWH_ABS), record.get("height"),
                                    record.get("width"), label, problems)
            kept += [obj] if obj is not None else []
        changed = len(kept) != len(record.get("annotations", [])) or any(
            a is not b for a, b in zip(kept, record.get("annotations", [])))
        out.append({**record, "annotations": kept} if changed else record)
    bad = _check_image_files([(r["file_name"], r.get("height"), r.get("width"), "") for r in out], where, options,
                             problems)
    out = [r for r in out if r["file_name"] not in bad]
    problems.summary()
    usable = [a for r in out for a in r.get("annotations", [])]
    _require_instances(usable, sum(len(r.get("annotations", [])) for r in records), where, options)
    return out
