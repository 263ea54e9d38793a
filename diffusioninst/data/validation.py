"""Checks of the records of any dataset loader: an error naming the dataset, the file and the entry, or a documented
repair. ``coco_json.py`` checks what a COCO file must hold before detectron2's ``load_coco_json`` reads it and uses
the checks here; records of other loaders (LVIS, Python) are checked by :func:`validate_records`. Policy, with
``DATASETS.SKIP_INVALID`` off / on:

* a malformed annotation file (missing, empty, not JSON, not COCO, bad entries, duplicate ids) and a training set
  without one usable instance (crowd regions are not instances): always an error;
* annotations of unlisted images or categories, and image files (``DATASETS.CHECK_IMAGE_FILES``) that are missing,
  unreadable or of another size than declared: error / dropped with a warning (none present: always an error);
* unusable annotations (no segmentation, bad box, no valid polygon, RLE of another size) and invalid polygons:
  dropped with a warning naming the annotation, whatever the switch.

Warnings go to the ``diffusioninst.data`` loggers: the first ``MAX_LOGGED`` per dataset, then a count by kind.
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from detectron2.structures import BoxMode
from PIL import Image

from ..errors import UserError
from .image_headers import jpeg_header

__all__ = ["DatasetFileNotFoundError", "DatasetValidationError", "Problems", "ValidationOptions", "check_annotation",
           "drop_bad_images", "validate_records"]

logger = logging.getLogger(__name__)

MAX_LOGGED = 10  # individual warnings logged per dataset; the rest are counted
SKIP_KEY, CHECK_FILES_KEY = "DATASETS.SKIP_INVALID", "DATASETS.CHECK_IMAGE_FILES"
NUM_CLASSES_KEY = "MODEL.DiffusionInst.NUM_CLASSES"
SKIP_HINT = f"or set {SKIP_KEY} True to drop them with a warning"


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


class Problems:
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


def is_number(x: Any) -> bool:
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
    if is_number(height) and is_number(width) and (x0 >= width or y0 >= height or x0 + w <= 0 or y0 + h <= 0):
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
    sized = is_number(height) and is_number(width)
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


def check_annotation(obj: dict, mode: Any, height: Any, width: Any, label: str, problems: Problems) -> dict | None:
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


CHUNK = 65536  # annotations checked at once by plainly_valid


def sizes_as_floats(values: list) -> np.ndarray:
    """Image heights or widths (numbers, or None / non-numbers) as float64, NaN where not a number (no check of the
    image bounds is made there, as in :func:`_bbox_problem`)."""
    return np.array([float(v) if is_number(v) else np.nan for v in values], dtype=np.float64)


def _plain_boxes(anns: list, heights: np.ndarray, widths: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """True where an annotation's bbox passes :func:`_bbox_problem` (False where unsure)."""
    boxes = [a.get("bbox") for a in anns]
    try:
        b = np.array(boxes)
    except (ValueError, TypeError):  # ragged, or not numbers
        return np.zeros(len(anns), bool)
    if b.shape != (len(anns), 4) or b.dtype.kind not in "biuf":  # strings, objects, missing boxes
        return np.zeros(len(anns), bool)
    b = b.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.isfinite(b).all(axis=1) & np.isfinite(b.sum(axis=1))
        xyxy = modes == int(BoxMode.XYXY_ABS)
        w = np.where(xyxy, b[:, 2] - b[:, 0], b[:, 2])
        h = np.where(xyxy, b[:, 3] - b[:, 1], b[:, 3])
        checked = xyxy | (modes == int(BoxMode.XYWH_ABS))
        outside = (b[:, 0] >= widths) | (b[:, 1] >= heights) | (b[:, 0] + w <= 0) | (b[:, 1] + h <= 0)
        ok &= ~checked | ((w > 0) & (h > 0) & ~outside)
    return ok


def _plain_polygons(segms: list) -> np.ndarray:
    """True where a segmentation is a non-empty list of polygons that :func:`_polygon_problem` accepts."""
    ok = np.array([type(s) is list and len(s) > 0 for s in segms], bool)
    counts = np.array([len(s) if good else 0 for s, good in zip(segms, ok)], np.int64)
    polygons = [p for s, good in zip(segms, ok) if good for p in s]
    if not polygons:
        return ok
    poly_ok = np.array([type(p) is list for p in polygons], bool)
    lengths = np.array([len(p) if good else 0 for p, good in zip(polygons, poly_ok)], np.int64)
    poly_ok &= (lengths >= 6) & (lengths % 2 == 0)
    try:
        totals = np.array(list(map(sum, polygons)) if poly_ok.all() else
                          [sum(p) if good else 0.0 for p, good in zip(polygons, poly_ok)], dtype=np.float64)
        poly_ok &= np.isfinite(totals)
    except (TypeError, ValueError, OverflowError):  # a coordinate that is not a number: the careful check says which
        return np.zeros(len(segms), bool)
    owner = np.repeat(np.arange(len(segms)), counts)
    return ok & (np.bincount(owner, weights=(~poly_ok).astype(np.float64), minlength=len(segms)) == 0)


def annotations_to_check(anns: list, heights: np.ndarray, widths: np.ndarray, modes: list | None = None) -> list[int]:
    """Indices of the annotations that :func:`check_annotation` must look at; it keeps every other one unchanged
    (with no warning), so checking only these gives the same result and messages, at full-dataset size in a few
    vectorised passes. ``heights``/``widths`` (float, :func:`sizes_as_floats`) and ``modes`` are per annotation
    (``modes`` None: all XYWH_ABS, as in COCO files)."""
    flagged: list[int] = []
    for start in range(0, len(anns), CHUNK):
        chunk = anns[start:start + CHUNK]
        crowd = [bool(a.get("iscrowd", 0)) for a in chunk]
        keep = [k for k, c in enumerate(crowd) if not c]
        if not keep:
            continue
        sub = [chunk[k] for k in keep]
        h, w = heights[start:start + CHUNK], widths[start:start + CHUNK]
        mode = np.full(len(sub), int(BoxMode.XYWH_ABS)) if modes is None else np.array(
            [int(m) if isinstance(m, (int, np.integer)) else -1 for m in modes[start:start + CHUNK]])[keep]
        ok = _plain_boxes(sub, h[keep], w[keep], mode) & _plain_polygons([a.get("segmentation") for a in sub])
        flagged += [start + keep[k] for k in np.flatnonzero(~ok).tolist()]
    return flagged


# ---------------------------------------------------------------------------------------------------------
# Image files


def _header_problem(path: str, height: Any, width: Any) -> str | None:
    """Why an image file cannot be used, from its header alone: missing, unreadable, or another size than declared
    (after EXIF orientation, as the mapper reads it). JPEGs are read by :func:`.image_headers.jpeg_header`; what it
    does not follow, and every file it cannot open, by PIL."""
    try:
        header = jpeg_header(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "is missing"
    except OSError:
        header = None  # PIL tells what is wrong
    if header is None:
        if not os.path.isfile(path):
            return "is missing"
        try:
            with Image.open(path) as image:
                w, h = image.size
                orientation = image.getexif().get(0x0112, 1)
        except Exception as exc:  # noqa: BLE001  (PIL raises many types for files that are not images)
            return (f"is not a readable image ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:120] if str(exc) else ''})")
    else:
        w, h, orientation = header
    w, h = (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # rotated by 90 degrees when read
    if is_number(height) and is_number(width) and (h, w) != (int(height), int(width)):
        return f"is {w}x{h} pixels but the dataset declares width {width}, height {height}"
    return None


def check_image_files(images: list[tuple[str, Any, Any, str]], where: str, options: ValidationOptions,
                       problems: Problems, image_root: str | None = None) -> set[str]:
    """Check ``(path, height, width, label)`` image files, one after the other (threads are slower: the parsing holds
    the GIL); return the paths to drop (with DATASETS.SKIP_INVALID), or raise naming the first bad file."""
    images = [img for img in images if "://" not in img[0]]
    if not options.check_image_files or not images:
        return set()
    found = [(img, why) for img in images if (why := _header_problem(*img[:3]))]
    missing = [img[0] for img, why in found if why == "is missing"]
    if missing and len(missing) == len(images):
        within = f" is under image_root {image_root}" if image_root else " exists"
        raise DatasetFileNotFoundError(f"{where}: none of the {len(images)} images it lists{within} (e.g. "
                                       f"{', '.join(missing[:3])}); is image_root right?")
    if missing and not options.skip_invalid:
        raise DatasetFileNotFoundError(
            f"{where}: {len(missing)} of the {len(images)} images it lists are missing on disk, e.g. "
            f"{', '.join(missing[:3])}; restore them or remove them from the dataset, {SKIP_HINT} (or "
            f"{CHECK_FILES_KEY} False to skip this check)")
    if found and not options.skip_invalid:
        (path, *_), why = found[0]
        more = f" ({len(found)} images in all)" if len(found) > 1 else ""
        raise DatasetValidationError(f"{where}: image {path} {why}{more}; replace it or remove it from the dataset, "
                                     f"{SKIP_HINT} (or {CHECK_FILES_KEY} False to skip these checks)")
    for (path, _, _, label), why in found:
        problems.warn("unusable images", f"image file {path}{label} {why}; image dropped")
    return {img[0] for img, _ in found}


def require_instances(annotations: list, total: int, where: str, options: ValidationOptions) -> None:
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
    for r, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise DatasetValidationError(f"{where}: record {r} has no 'file_name': {record!r}"[:400])
    problems, num_classes = Problems(where), options.num_classes
    per_record = [record.get("annotations", []) for record in records]
    counts = np.array([len(anns) for anns in per_record], np.int64)
    flat = [obj for anns in per_record for obj in anns]
    flagged = set(annotations_to_check(
        flat, np.repeat(sizes_as_floats([r.get("height") for r in records]), counts),
        np.repeat(sizes_as_floats([r.get("width") for r in records]), counts),
        [obj.get("bbox_mode", BoxMode.XYWH_ABS) for obj in flat]))
    flagged.update(k for k, obj in enumerate(flat) if not _plain_category(obj.get("category_id"), num_classes))
    out, first = [], 0
    for record, anns in zip(records, per_record):
        todo = [j for j in range(len(anns)) if first + j in flagged] if flagged else []
        first += len(anns)
        if not todo:
            out.append(record)
            continue
        kept = list(anns)
        for j in todo:
            kept[j] = _check_record_annotation(anns[j], j, record, where, options, problems)
        kept = [obj for obj in kept if obj is not None]
        changed = len(kept) != len(anns) or any(a is not b for a, b in zip(kept, anns))
        out.append({**record, "annotations": kept} if changed else record)
    return drop_bad_images(out, len(flat), where, options, problems)


def _plain_category(category: Any, num_classes: int | None) -> bool:
    return type(category) is int and category >= 0 and (not num_classes or category < num_classes)


def _check_record_annotation(obj: dict, j: int, record: dict, where: str, options: ValidationOptions,
                             problems: Problems) -> dict | None:
    """One annotation of a loader's record: its category id (an error, or dropped with DATASETS.SKIP_INVALID), then
    :func:`check_annotation`; the annotation to keep, or None."""
    label = f"annotation {j}{' (id ' + repr(obj['id']) + ')' if 'id' in obj else ''} of {record['file_name']}"
    category, num_classes = obj.get("category_id"), options.num_classes
    if not isinstance(category, (int, np.integer)) or category < 0 or (num_classes and category >= num_classes):
        bound = f"[0, {num_classes}) ({NUM_CLASSES_KEY})" if num_classes is not None else "non-negative"
        message = f"{label} has category id {category!r}, outside {bound}"
        if not options.skip_invalid:
            raise DatasetValidationError(f"{where}: {message}; fix the dataset or the config, {SKIP_HINT}")
        problems.warn("annotations of unknown categories", f"{message}; annotation dropped")
        return None
    return check_annotation(obj, obj.get("bbox_mode", BoxMode.XYWH_ABS), record.get("height"), record.get("width"),
                            label, problems)


def drop_bad_images(records: list[dict], total: int, where: str, options: ValidationOptions, problems: Problems,
                    image_root: str | None = None) -> list[dict]:
    """The records whose image file is usable (or raise, without DATASETS.SKIP_INVALID); then log the summary of
    ``problems`` and require one instance (of ``total`` annotations before repairs) in a training set. With
    ``image_root`` (a COCO file's records) messages also name the image id and say where images were looked for."""
    labels = [f" (image id {r['image_id']!r})" if image_root is not None else "" for r in records]
    bad = check_image_files([(r["file_name"], r.get("height"), r.get("width"), label)
                             for r, label in zip(records, labels)], where, options, problems, image_root)
    records = [r for r in records if r["file_name"] not in bad]
    problems.summary()
    require_instances([a for r in records for a in r.get("annotations", [])], total, where, options)
    return records
