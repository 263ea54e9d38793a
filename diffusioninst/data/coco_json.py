"""What a COCO instances file must hold before detectron2's ``load_coco_json`` reads it (that loader stops with a
bare KeyError or AssertionError on a malformed entry, and silently drops annotations of unlisted images and invalid
polygons): its JSON, entries, ids and references are checked here, its annotations by ``validation.py``; then
``load_coco_json`` makes the records from the same parsed JSON (repaired when entries were dropped; the file is read
once) and the records' image files are checked. Policy: ``validation.py``'s docstring.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Callable, Iterator

import numpy as np
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from .validation import (
    SKIP_HINT, DatasetFileNotFoundError, DatasetValidationError, Problems, ValidationOptions, annotations_to_check,
    check_annotation, drop_bad_images, is_number, sizes_as_floats,
)

__all__ = ["check_categories", "load_coco_checked", "parsed_json", "read_json"]


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
    return is_number(v) and math.isfinite(v) and v > 0 and v == int(v)


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
    if kind == "annotations" and _plain_annotations(data[kind], unique):
        return data[kind]
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


def _plain_annotations(annotations: list, unique: bool) -> bool:
    """True when every annotation entry is an object with 'id', 'image_id' and 'category_id' (ids unique if
    ``unique``): what :func:`_check_entries` asks, in a few passes; else it looks entry by entry and names the bad one."""
    if any(type(a) is not dict for a in annotations):
        return False
    for key in ("image_id", "category_id"):
        if any(a.get(key) is None for a in annotations):
            return False
    ids = [a.get("id") for a in annotations]
    try:
        return not any(i is None for i in ids) and (not unique or len(set(ids)) == len(ids))
    except TypeError:  # an unhashable id
        return False


def check_categories(categories: list, where: str) -> dict:
    """Category id -> name of a COCO/LVIS 'categories' list, which must be non-empty with unique integer ids."""
    return {c["id"]: c["name"] for c in _check_entries({"categories": categories}, "categories", where)}


def _check_references(annotations: list, images: dict, categories: dict, where: str, options: ValidationOptions,
                      problems: Problems) -> list:
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
            f"same export? Fix the file, {SKIP_HINT}")
    if unknown and not options.skip_invalid:
        ann = unknown[0]
        raise DatasetValidationError(
            f"{where}: {len(unknown)} annotation(s) have a category_id not in 'categories' (ids {sorted(categories)}), "
            f"e.g. annotation id {ann['id']!r} of {images[ann['image_id']]['file_name']} with category_id "
            f"{ann['category_id']!r}; add the category or fix the annotations, {SKIP_HINT}")
    for ann in orphans:
        problems.warn("annotations of unknown images", f"annotation id {ann['id']!r} refers to image_id "
                      f"{ann['image_id']!r}, which is not in 'images'; annotation dropped")
    for ann in unknown:
        problems.warn("annotations of unknown categories", f"annotation id {ann['id']!r} of "
                      f"{images[ann['image_id']]['file_name']} has category_id {ann['category_id']!r}, not in "
                      "'categories'; annotation dropped")
    if not orphans and not unknown:
        return annotations
    dropped = {id(a) for a in orphans + unknown}
    return [a for a in annotations if id(a) not in dropped]


def load_coco_checked(json_file: str, image_root: str, dataset_name: str,
                      options: ValidationOptions = ValidationOptions()) -> list[dict]:
    """Check a COCO instances file, read it with detectron2's ``load_coco_json``, then check its records' image files:
    for valid data the same records and metadata; bad entries raise or are dropped as ``validation.py`` says.

    The file is parsed once: ``load_coco_json`` gets the checked (or repaired) JSON through :func:`parsed_json`."""
    where = f"dataset {dataset_name!r} ({json_file})"
    data = read_json(json_file, where)
    images = {img["id"]: img for img in _check_entries(data, "images", where)}
    annotations = _check_entries(data, "annotations", where, options.is_train, " (a training set needs instance "
                                 "annotations)", unique="minival" not in json_file)  # detectron2 exempts 2014 minival
    categories = {c["id"]: c for c in _check_entries(data, "categories", where)}
    problems = Problems(where)
    usable = _check_references(annotations, images, categories, where, options, problems)
    owners = [images[a["image_id"]] for a in usable]
    heights = sizes_as_floats([img["height"] for img in images.values()])
    widths = sizes_as_floats([img["width"] for img in images.values()])
    position = {image_id: k for k, image_id in enumerate(images)}
    where_of = np.array([position[a["image_id"]] for a in usable], np.int64)
    flagged = annotations_to_check(usable, heights[where_of], widths[where_of])
    if flagged:
        usable = list(usable)
        for k in flagged:
            img = owners[k]
            usable[k] = check_annotation(usable[k], BoxMode.XYWH_ABS, img["height"], img["width"],
                                         f"annotation id {usable[k]['id']!r} of {img['file_name']}", problems)
        usable = [obj for obj in usable if obj is not None]
    del owners, where_of
    if len(usable) != len(annotations) or any(a is not b for a, b in zip(usable, annotations)):
        data = {**data, "annotations": usable}  # the repaired file that load_coco_json reads
    total = len(annotations)
    del annotations, usable, images, categories
    with parsed_json(json_file, data):
        records = load_coco_json(json_file, image_root, dataset_name)
    del data
    return drop_bad_images(records, total, where, options, problems, image_root)


@contextlib.contextmanager
def parsed_json(json_file: str, dataset: dict) -> Iterator[None]:
    """While open, a pycocotools ``COCO`` (what detectron2's ``load_coco_json`` builds from the file's path) or an
    ``lvis.LVIS`` (``load_lvis_json``) made for ``json_file`` takes the already parsed ``dataset`` instead of reading the
    file again: one parse and one copy of the JSON. Other files are read as usual."""
    import pycocotools.coco

    target = os.path.realpath(PathManager.get_local_path(json_file))

    def ours(path: Any) -> bool:
        return isinstance(path, str) and os.path.realpath(path) == target

    coco_class = pycocotools.coco.COCO

    class ParsedCOCO(coco_class):
        def __init__(self, annotation_file: Any = None):
            if not ours(annotation_file):
                super().__init__(annotation_file)
                return
            super().__init__()
            self.dataset = dataset
            self.createIndex()

    patched = [(pycocotools.coco, "COCO", coco_class, ParsedCOCO)]
    try:
        import lvis

        lvis_class = lvis.LVIS

        class ParsedLVIS(lvis_class):
            def _load_json(self, path: Any) -> dict:
                return dataset if ours(path) else super()._load_json(path)

        patched += [(lvis, "LVIS", lvis_class, ParsedLVIS)]
    except ImportError:  # the lvis package is needed for LVIS-format files only
        pass
    for module, name, _, replacement in patched:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original, _ in patched:
            setattr(module, name, original)
