"""A small synthetic COCO-format instance-segmentation dataset ("shapes"), generated deterministically.

Used for CPU smoke training and the end-to-end tests: four shape classes drawn with random colours, sizes
and rotations over textured backgrounds, with occlusion. Each annotation's polygons describe exactly the
visible pixels of its instance. Depends only on numpy, OpenCV and pycocotools (not on detectron2).
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np
from pycocotools import mask as mask_util

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_LVIS_FREQUENCY",
    "generate_shapes_dataset",
    "shapes_dataset_paths",
    "shapes_lvis_paths",
    "write_shapes_lvis",
]

SHAPES_CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "star", "supercategory": "shape"},
]

# LVIS frequency group of each shape class in the LVIS-format split (write_shapes_lvis): the training split keeps a
# class's annotations in every image ("f"), in one image of _LVIS_KEEP_EVERY["c"] ("c") or of _LVIS_KEEP_EVERY["r"]
# ("r"), so the groups form a real long tail, as LVIS's rare (1-10 images) / common (11-100) / frequent (>100) do.
SHAPES_LVIS_FREQUENCY: dict[str, str] = {"circle": "f", "square": "f", "triangle": "c", "star": "r"}
_LVIS_KEEP_EVERY = {"f": 1, "c": 4, "r": 16}

# Bump when the generator's output changes, so an existing dataset made by an older version is detected.
_FORMAT_VERSION = 1
_SPLITS = ("train", "val")
# Image i of a split (0-based) is left without instances when i % _EMPTY_EVERY == 0.
_EMPTY_EVERY = 10
# An instance is dropped when less than this fraction of it stays visible.
_MIN_VISIBLE_FRACTION = 0.2
# Contours are traced on a mask upsampled by this factor, so that polygon vertices fall a quarter pixel
# inside the boundary pixels and pycocotools rasterizes the polygons back to exactly the visible mask.
_CONTOUR_UPSAMPLE = 2
# Sub-pixel precision (bits) of OpenCV's drawing functions.
_DRAW_SHIFT = 4


def shapes_dataset_paths(root: str, split: str) -> tuple[str, str]:
    """Return ``(json_file, image_root)`` of one split of the shapes dataset under ``root``."""
    shapes_dir = os.path.join(root, "shapes")
    return (
        os.path.join(shapes_dir, "annotations", f"instances_{split}.json"),
        os.path.join(shapes_dir, split),
    )


def generate_shapes_dataset(
    root: str,
    num_train: int = 240,
    num_val: int = 60,
    image_size: int = 192,
    seed: int = 0,
    *,
    max_instances: int = 6,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Write the shapes dataset to ``<root>/shapes`` and return that directory; same arguments, same bytes.

    The dataset is built in a temporary directory next to the target and moved into place with one rename,
    so concurrent callers (e.g. the processes of a distributed job) never see it half-written. An existing
    dataset made with the same arguments is reused; one made with different arguments raises
    ``FileExistsError`` unless ``overwrite`` is set, which always regenerates and replaces it. ``progress``, if
    given, is called with a line of text every tenth of each split.
    """
    if min(num_train, num_val) < 0 or max_instances < 0:
        raise ValueError("num_train, num_val and max_instances must be non-negative")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    params = {
        "format_version": _FORMAT_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "seed": int(seed),
        "max_instances": int(max_instances),
    }
    target = os.path.join(root, "shapes")
    # An empty directory is replaced like a missing one (renaming onto it is still atomic).
    if not overwrite and os.path.lexists(target) and not (os.path.isdir(target) and not os.listdir(target)):
        _check_existing(target, params)
        return target

    os.makedirs(root, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".shapes-tmp-", dir=root)
    try:
        os.chmod(tmp_dir, 0o755)
        for split_index, split in enumerate(_SPLITS):
            _write_split(tmp_dir, split, split_index, params, progress)
        _publish(tmp_dir, target, params, overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def _read_params(shapes_dir: str) -> dict[str, Any] | None:
    """Generator arguments recorded in an existing dataset, or None if it is incomplete or not ours."""
    json_files = [os.path.join(shapes_dir, "annotations", f"instances_{s}.json") for s in _SPLITS]
    if not all(os.path.isfile(f) for f in json_files):
        return None
    try:
        with open(json_files[0]) as f:
            return json.load(f)["info"]["generator"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_existing(target: str, params: dict[str, Any]) -> None:
    existing = _read_params(target)
    if existing != params:
        raise FileExistsError(
            f"{target} already exists but was not generated with {params} (found: {existing}). "
            "Pass overwrite=True (tools/generate_shapes.py --force) to regenerate it."
        )


def _publish(tmp_dir: str, target: str, params: dict[str, Any], overwrite: bool) -> None:
    """Move the finished dataset into place atomically; tolerate a concurrent identical publish."""
    try:
        os.rename(tmp_dir, target)
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if not overwrite:
        _check_existing(target, params)
        return
    # Replacing a dataset cannot be a single rename: move the old one aside first.
    old_dir = tmp_dir + ".old"
    os.rename(target, old_dir)
    os.rename(tmp_dir, target)
    shutil.rmtree(old_dir, ignore_errors=True)


@dataclass
class _Shape:
    category_id: int
    mask: np.ndarray  # HxW uint8, the whole (unoccluded) shape
    color: np.ndarray  # (3,) float RGB
    center: np.ndarray  # (2,) float xy
    radius: float
    shade_angle: float
    shade_amplitude: float


def _write_split(out_dir: str, split: str, split_index: int, params: dict[str, Any],
                 progress: Callable[[str], None] | None = None) -> None:
    num_images = params["num_train"] if split == "train" else params["num_val"]
    size = params["image_size"]
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir)
    images, annotations = [], []
    for i in range(num_images):
        if progress is not None and (i + 1) % max(1, num_images // 10) == 0:
            progress(f"{split}: {i + 1}/{num_images} images")
        # One generator per image, keyed by (seed, split, index): images do not depend on each other.
        rng = np.random.default_rng([params["seed"], split_index, i])
        image_id = i + 1
        file_name = f"{image_id:06d}.png"
        num_instances = 0 if i % _EMPTY_EVERY == 0 else int(rng.integers(1, params["max_instances"] + 1))
        image, instances = _make_image(rng, size, num_instances)
        if not cv2.imwrite(os.path.join(image_dir, file_name), image[:, :, ::-1]):
            raise OSError(f"Failed to write {os.path.join(image_dir, file_name)}")
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for category_id, polygons, area, bbox in instances:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": polygons,
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": f"DiffusionInst synthetic shapes, {split} split",
            "version": str(_FORMAT_VERSION),
            "generator": params,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": SHAPES_CATEGORIES,
    }
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    with open(os.path.join(ann_dir, f"instances_{split}.json"), "w") as f:
        f.write(json.dumps(coco, separators=(",", ":")))


def _make_image(
    rng: np.random.Generator, size: int, num_instances: int
) -> tuple[np.ndarray, list[tuple[int, list[list[float]], float, list[float]]]]:
    """Render one RGB image and return it with (category_id, polygons, area, bbox) per visible instance."""
    background = _background(rng, size)
    background_mean = background.reshape(-1, 3).mean(axis=0)
    shapes = [_random_shape(rng, size, background_mean) for _ in range(num_instances)]
    min_area = max(8, round(0.0015 * size * size))

    # Drop instances that are too occluded or whose visible part has holes (not expressible as COCO
    # polygons), then re-derive the visible parts of the rest, until every remaining instance is valid.
    while True:
        owner = np.full((size, size), -1, dtype=np.int64)
        for k, shape in enumerate(shapes):
            owner[shape.mask > 0] = k
        results, valid = [], []
        for k, shape in enumerate(shapes):
            visible = (owner == k).astype(np.uint8)
            area = int(visible.sum())
            ann = None
            if area >= max(min_area, _MIN_VISIBLE_FRACTION * int(shape.mask.sum())):
                ann = _mask_to_annotation(visible)
            valid.append(ann is not None)
            if ann is not None:
                results.append((shape.category_id, *ann))
        if all(valid):
            break
        shapes = [s for s, ok in zip(shapes, valid) if ok]

    image = background
    for k, shape in enumerate(shapes):
        ys, xs = np.nonzero(owner == k)
        # A gentle linear shading across each shape, so shapes are not flat either.
        direction = (xs - shape.center[0]) * math.cos(shape.shade_angle) + (ys - shape.center[1]) * math.sin(
            shape.shade_angle
        )
        shade = np.clip(direction / shape.radius, -1.0, 1.0) * shape.shade_amplitude
        image[ys, xs] = shape.color + shade[:, None].astype(np.float32)
    image += 3.0 * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), results


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured HxWx3 float background: a colour gradient, smooth noise and, half of the time, stripes."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = coords[None, :], coords[:, None]
    image = np.broadcast_to(rng.uniform(50, 205, size=3).astype(np.float32), (size, size, 3)).copy()

    theta = rng.uniform(0, 2 * math.pi)
    ramp = (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta)
    image += ramp[:, :, None] * rng.uniform(-80, 80, size=3).astype(np.float32)

    cells = int(rng.integers(3, 9))
    noise = rng.normal(0.0, 1.0, size=(cells, cells, 3)).astype(np.float32)
    noise = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    image += noise * rng.uniform(8, 25)

    if rng.random() < 0.5:
        phi = rng.uniform(0, math.pi)
        frequency = rng.uniform(4, 14)
        phase = rng.uniform(0, 2 * math.pi)
        stripes = np.sin(2 * math.pi * frequency * (xx * math.cos(phi) + yy * math.sin(phi)) + phase)
        image += stripes[:, :, None] * rng.uniform(6, 20)
    return image


def _random_shape(rng: np.random.Generator, size: int, background_mean: np.ndarray) -> _Shape:
    category_id = int(rng.integers(1, len(SHAPES_CATEGORIES) + 1))
    center = rng.uniform(0.1 * size, 0.9 * size, size=2)
    radius = float(rng.uniform(0.07, 0.2) * size)
    angle = float(rng.uniform(0, 2 * math.pi))

    mask = np.zeros((size, size), dtype=np.uint8)
    scale = 1 << _DRAW_SHIFT
    name = SHAPES_CATEGORIES[category_id - 1]["name"]
    if name == "circle":
        cx, cy = (int(round(v * scale)) for v in center)
        cv2.circle(mask, (cx, cy), int(round(radius * scale)), 1, -1, cv2.LINE_8, _DRAW_SHIFT)
    else:
        if name == "square":
            vertices = _regular_polygon(center, radius, 4, angle)
        elif name == "triangle":
            vertices = _regular_polygon(center, 1.2 * radius, 3, angle)
        else:
            vertices = _star(center, 1.1 * radius, float(rng.uniform(0.4, 0.55)), angle)
        points = np.round(vertices * scale).astype(np.int32)
        cv2.fillPoly(mask, [points], 1, cv2.LINE_8, _DRAW_SHIFT)

    # Pick a colour that stands out from the background on average (best of a few draws).
    candidates = rng.uniform(0, 255, size=(8, 3))
    color = candidates[np.argmax(np.linalg.norm(candidates - background_mean, axis=1))]
    return _Shape(
        category_id=category_id,
        mask=mask,
        color=color.astype(np.float32),
        center=center,
        radius=radius,
        shade_angle=float(rng.uniform(0, 2 * math.pi)),
        shade_amplitude=float(rng.uniform(0, 25)),
    )


def _regular_polygon(center: np.ndarray, radius: float, num_sides: int, angle: float) -> np.ndarray:
    t = angle + 2 * math.pi * np.arange(num_sides) / num_sides
    return center + radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(center: np.ndarray, radius: float, inner_ratio: float, angle: float, points: int = 5) -> np.ndarray:
    t = angle + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, radius, radius * inner_ratio)
    return center + r[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)


def _mask_to_annotation(visible: np.ndarray) -> tuple[list[list[float]], float, list[float]] | None:
    """COCO polygons, area and XYWH bbox of a binary mask; None if polygons cannot reproduce it exactly."""
    h, w = visible.shape
    s = _CONTOUR_UPSAMPLE
    upsampled = cv2.resize(visible, (w * s, h * s), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(upsampled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = [
        ((c.reshape(-1, 2).astype(np.float64) + 0.5) / s).ravel().tolist() for c in contours if len(c) >= 3
    ]
    if not polygons:
        return None
    rle = mask_util.merge(mask_util.frPyObjects(polygons, h, w))
    if not np.array_equal(mask_util.decode(rle), visible):
        return None  # the visible part has a hole
    bbox = [float(v) for v in mask_util.toBbox(rle)]
    return polygons, float(mask_util.area(rle)), bbox


def shapes_lvis_paths(root: str, split: str) -> tuple[str, str]:
    """Return ``(json_file, image_root)`` of one split of the LVIS-format shapes dataset under ``root``.

    Images are shared with the COCO-format split; as in LVIS v1, each image is located by its ``coco_url``'s
    last two parts under ``image_root`` (``<root>/shapes/`` + ``<split>/<file>``).
    """
    shapes_dir = os.path.join(root, "shapes")
    return os.path.join(shapes_dir, "annotations", f"lvis_v1_{split}.json"), shapes_dir + os.sep


def write_shapes_lvis(root: str) -> tuple[str, str]:
    """Write the LVIS-v1-format version of the shapes dataset under ``<root>/shapes`` (generated first if missing)
    and return the paths of the train and val json files. Deterministic; a file written from the same COCO-format
    dataset is left as it is (one from a regenerated dataset is rewritten).

    Train: federated annotation with a long tail (:data:`SHAPES_LVIS_FREQUENCY`): a dropped instance's class is
    neither positive nor negative for its image, as in LVIS. Val: every instance kept; ``neg_category_ids`` lists the
    absent classes (one is left unverified in every third image) and every fourth image marks its first class as
    ``not_exhaustive_category_ids``, so evaluation meets all three of LVIS's per-image category states.
    """
    if not os.path.isfile(shapes_dataset_paths(root, "val")[0]):
        generate_shapes_dataset(root)
    train = _lvis_split(root, "train", None)
    counts = {c["id"]: (c["image_count"], c["instance_count"]) for c in train["categories"]}
    out = []
    for split, data in (("train", train), ("val", _lvis_split(root, "val", counts))):
        path = shapes_lvis_paths(root, split)[0]
        if _read_info(path) != data["info"]:
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(json.dumps(data, separators=(",", ":")))
            os.replace(tmp, path)
        out.append(path)
    return out[0], out[1]


def _read_info(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)["info"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _lvis_split(root: str, split: str, train_counts: dict[int, tuple[int, int]] | None) -> dict[str, Any]:
    """The LVIS-format dict of one split; categories carry the training split's image and instance counts."""
    with open(shapes_dataset_paths(root, split)[0]) as f:
        coco = json.load(f)
    frequency = {c["id"]: SHAPES_LVIS_FREQUENCY[c["name"]] for c in SHAPES_CATEGORIES}
    cat_ids = [c["id"] for c in SHAPES_CATEGORIES]
    by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    images, annotations = [], []
    for index, img in enumerate(coco["images"]):
        anns = by_image[img["id"]]
        if train_counts is None:  # federated training labels: a class is kept in one image of _LVIS_KEEP_EVERY
            anns = [a for a in anns if index % _LVIS_KEEP_EVERY[frequency[a["category_id"]]] == 0]
        present = sorted({a["category_id"] for a in anns})
        absent = [c for c in cat_ids if c not in present]
        if train_counts is None:
            dropped = {a["category_id"] for a in by_image[img["id"]]} - set(present)
            negative = [c for c in absent if c not in dropped]  # a dropped class is unknown, not absent
            not_exhaustive: list[int] = []
        else:
            negative = absent[1:] if index % 3 == 0 and absent else absent
            not_exhaustive = present[:1] if index % 4 == 0 else []
        images.append({
            "id": img["id"],
            "width": img["width"],
            "height": img["height"],
            "coco_url": f"http://shapes.invalid/{split}/{img['file_name']}",
            "neg_category_ids": negative,
            "not_exhaustive_category_ids": not_exhaustive,
        })
        annotations += [{k: a[k] for k in ("id", "image_id", "category_id", "segmentation", "area", "bbox")}
                        for a in anns]
    if train_counts is None:
        train_counts = {c: (len({a["image_id"] for a in annotations if a["category_id"] == c}),
                            sum(a["category_id"] == c for a in annotations)) for c in cat_ids}
    categories = [{
        "id": c["id"], "name": c["name"], "synonyms": [c["name"]], "synset": f"{c['name']}.n.01",
        "def": f"a {c['name']} drawn on a textured background", "frequency": frequency[c["id"]],
        "image_count": train_counts[c["id"]][0], "instance_count": train_counts[c["id"]][1],
    } for c in SHAPES_CATEGORIES]
    return {"info": {**coco["info"], "description": f"DiffusionInst synthetic shapes, LVIS v1 format, {split} split"},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}
