"""Synthetic annotation files of the real sizes of COCO 2017 and LVIS v1, laid out as detectron2's builtin datasets
(``$DETECTRON2_DATASETS/coco/...``, ``$DETECTRON2_DATASETS/lvis/...``), for the data-loading benchmark.

The files have the real files' counts of images, annotations and categories (COCO's 80 category ids and names,
LVIS v1's 1203 categories), polygons of realistic length (COCO: ~26 points a polygon, LVIS: ~42; 1-3 polygons an
object), a few uncompressed-RLE crowd regions (COCO, 1% of objects) and the LVIS image fields
(``coco_url``, ``neg_category_ids``, ``not_exhaustive_category_ids``). Image files are hard links of a few small
JPEGs of the declared sizes, so the whole tree needs little disk (a file system allows ~65,000 links to one file;
each template gets far fewer). The JSON text is written piece by piece, never held as one Python object.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import numpy as np
from PIL import Image

__all__ = ["SPLITS", "SplitSpec", "generate", "split_paths"]

# (width, height) of the template JPEGs; images are spread over them in turn.
TEMPLATE_SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 360), (612, 612), (640, 512)]


@dataclass(frozen=True)
class SplitSpec:
    """One annotation file: its counts and where detectron2's builtin registration looks for it."""

    name: str  # detectron2's builtin dataset name
    kind: str  # "coco" or "lvis"
    images: int
    annotations: int
    json_file: str  # relative to the dataset root
    image_folder: str  # the folder (under coco/) of its image files
    first_image: int = 0  # index of its first image among the folder's images (LVIS reuses COCO's image files)
    mean_points: int = 26  # mean points per polygon


# The real files' counts: COCO 2017 instances, LVIS v1 (LVIS's images are COCO 2017's files).
SPLITS: Dict[str, SplitSpec] = {s.name: s for s in [
    SplitSpec("coco_2017_train", "coco", 118_287, 860_001, "coco/annotations/instances_train2017.json", "train2017"),
    SplitSpec("coco_2017_val", "coco", 5_000, 36_781, "coco/annotations/instances_val2017.json", "val2017"),
    SplitSpec("lvis_v1_train", "lvis", 100_170, 1_270_141, "lvis/lvis_v1_train.json", "train2017", mean_points=42),
    SplitSpec("lvis_v1_val", "lvis", 19_809, 244_707, "lvis/lvis_v1_val.json", "train2017", first_image=98_478,
              mean_points=42),
]}
IMAGE_FOLDERS = {"train2017": 118_287, "val2017": 5_000}
CROWD_FRACTION = 0.01  # COCO: about 1% of objects are crowd regions, stored as uncompressed RLE


def split_paths(root: str, name: str) -> tuple[str, str]:
    """(json file, image root) of a builtin dataset under ``root``, as detectron2's builtin registration has them."""
    spec = SPLITS[name]
    image_root = os.path.join(root, "coco", spec.image_folder) if spec.kind == "coco" else os.path.join(root, "coco")
    return os.path.join(root, spec.json_file), image_root


def _image_ids(folder: str) -> np.ndarray:
    """COCO-like image ids of a folder's images (distinct across folders)."""
    offset = 0 if folder == "train2017" else 600_000
    return offset + 9 + 3 * np.arange(IMAGE_FOLDERS[folder], dtype=np.int64)


def _write_templates(root: str) -> List[str]:
    folder = os.path.join(root, "templates")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, (w, h) in enumerate(TEMPLATE_SIZES):
        path = os.path.join(folder, f"template_{w}x{h}.jpg")
        if not os.path.isfile(path):
            rng = np.random.default_rng(k)
            tile = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            Image.fromarray(np.kron(tile, np.ones((16, 16, 1), np.uint8))[:h, :w]).save(path, quality=60)
        paths.append(path)
    return paths


def _link_images(root: str, folder: str, templates: Sequence[str], log: Callable[[str], None]) -> None:
    """``coco/<folder>/<id>.jpg`` for every image of the folder: hard links of the templates in turn."""
    out = os.path.join(root, "coco", folder)
    os.makedirs(out, exist_ok=True)
    ids = _image_ids(folder)
    done = 0
    for k, image_id in enumerate(ids.tolist()):
        path = os.path.join(out, f"{image_id:012d}.jpg")
        if not os.path.exists(path):
            os.link(templates[k % len(templates)], path)
            done += 1
    log(f"{folder}: {len(ids)} image files ({done} new hard links of {len(templates)} templates)")


def _polygons(rng: np.random.Generator, w: float, h: float, count: int, mean_points: int) -> tuple[str, list, float]:
    """A JSON ``segmentation`` of 1-3 polygons inside the image, its bbox [x, y, w, h] and an area."""
    bw, bh = rng.uniform(8, w * 0.6), rng.uniform(8, h * 0.6)
    x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    parts = []
    for _ in range(count):
        n = max(3, int(rng.poisson(mean_points)))
        angle = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(0.6, 1.0, n)
        xy = np.empty(2 * n)
        xy[0::2] = x0 + bw * (0.5 + 0.5 * radius * np.cos(angle))
        xy[1::2] = y0 + bh * (0.5 + 0.5 * radius * np.sin(angle))
        parts.append("[" + ",".join(map(repr, np.round(xy, 2).tolist())) + "]")
    bbox = [round(x0, 2), round(y0, 2), round(bw, 2), round(bh, 2)]
    return "[" + ",".join(parts) + "]", bbox, round(bw * bh * 0.7, 4)


def _crowd_rle(rng: np.random.Generator, w: int, h: int) -> tuple[str, list, float]:
    """An uncompressed RLE (column-major run lengths, as COCO's crowd regions) of a rectangle, its bbox and area."""
    bw, bh = int(rng.integers(8, w // 2)), int(rng.integers(8, h // 2))
    x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    counts = [x0 * h + y0]
    for _ in range(bw - 1):
        counts += [bh, h - bh]
    counts += [bh, h * w - sum(counts) - bh]
    return json.dumps({"counts": counts, "size": [h, w]}, separators=(",", ":")), [x0, y0, bw, bh], float(bw * bh)


def _write_list(f: TextIO, key: str, items, last: bool = False) -> None:
    f.write(f'"{key}":[')
    for k, item in enumerate(items):
        f.write(("," if k else "") + item)
    f.write("]" + ("" if last else ","))


def _categories(kind: str) -> List[dict]:
    if kind == "coco":
        from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

        return [{"supercategory": "thing", "id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    return [dict(c) for c in LVIS_CATEGORIES]


def write_split(root: str, spec: SplitSpec, seed: int = 0) -> str:
    """Write one annotation file; returns its path."""
    rng = np.random.default_rng(seed)
    json_file = os.path.join(root, spec.json_file)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    categories = _categories(spec.kind)
    cat_ids = np.array([c["id"] for c in categories])
    folders = [spec.image_folder] * spec.images
    ids = _image_ids(spec.image_folder)[spec.first_image:spec.first_image + spec.images].tolist()
    if len(ids) < spec.images:  # LVIS val: the rest from val2017, as LVIS v1 val mixes COCO's train and val images
        extra = spec.images - len(ids)
        ids += _image_ids("val2017")[:extra].tolist()
        folders[-extra:] = ["val2017"] * extra
    sizes = [TEMPLATE_SIZES[(i - 9) // 3 % len(TEMPLATE_SIZES) if i < 600_000 else (i - 600_009) // 3
                            % len(TEMPLATE_SIZES)] for i in ids]
    # objects per image: a long-tailed count that sums to the file's number of annotations
    weights = rng.pareto(1.5, spec.images) + 0.2
    per_image = np.floor(weights / weights.sum() * spec.annotations).astype(np.int64)
    per_image[rng.choice(spec.images, spec.annotations - int(per_image.sum()), replace=False)] += 1
    image_counts = np.zeros(len(categories), np.int64)
    tmp = json_file + ".tmp"
    with open(tmp, "w") as f:
        f.write('{"info":{"description":"synthetic, sized as ' + spec.name + '"},"licenses":[],')
        images = []
        for image_id, folder, (w, h) in zip(ids, folders, sizes):
            entry = {"id": image_id, "width": w, "height": h, "license": 1}
            name = f"{image_id:012d}.jpg"
            if spec.kind == "coco":
                entry["file_name"] = name
            else:
                entry["coco_url"] = f"http://images.cocodataset.org/{folder}/{name}"
                entry["neg_category_ids"] = sorted(rng.choice(cat_ids, 3, replace=False).tolist())
                entry["not_exhaustive_category_ids"] = sorted(rng.choice(cat_ids, 1).tolist())
            images.append(json.dumps(entry, separators=(",", ":")))
        _write_list(f, "images", images)
        del images
        f.write('"annotations":[')
        ann_id = 1
        for k, (image_id, (w, h), n) in enumerate(zip(ids, sizes, per_image.tolist())):
            classes = rng.choice(cat_ids, n)
            image_counts[np.searchsorted(cat_ids, np.unique(classes))] += 1
            for cat in classes.tolist():
                crowd = spec.kind == "coco" and rng.random() < CROWD_FRACTION
                if crowd:
                    segm, bbox, area = _crowd_rle(rng, w, h)
                else:
                    segm, bbox, area = _polygons(rng, w, h, 1 + int(rng.random() < 0.15) + int(rng.random() < 0.05),
                                                 spec.mean_points)
                extra = f'"iscrowd":{int(crowd)},' if spec.kind == "coco" else ""
                f.write(("," if ann_id > 1 else "") + f'{{"segmentation":{segm},"area":{area},{extra}"image_id":'
                        f'{image_id},"bbox":{json.dumps(bbox)},"category_id":{cat},"id":{ann_id}}}')
                ann_id += 1
        f.write("],")
        if spec.kind == "lvis":
            for c, count in zip(categories, image_counts.tolist()):
                c["image_count"], c["instance_count"] = count, count
        _write_list(f, "categories", [json.dumps(c, separators=(",", ":")) for c in categories], last=True)
        f.write("}")
    os.replace(tmp, json_file)
    return json_file


def generate(root: str, names: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> None:
    """Write the annotation files ``names`` (default: all of :data:`SPLITS`) and the image files they list under
    ``root``; files already there are kept."""
    names = list(names or SPLITS)
    templates = _write_templates(root)
    for folder in sorted({SPLITS[n].image_folder for n in names} | ({"val2017"} if "lvis_v1_val" in names else set())):
        _link_images(root, folder, templates, log)
    for name in names:
        json_file = os.path.join(root, SPLITS[name].json_file)
        if os.path.isfile(json_file):
            log(f"{name}: {json_file} exists, kept")
            continue
        write_split(root, SPLITS[name])
        log(f"{name}: wrote {json_file} ({os.path.getsize(json_file) / 2**20:.0f} MiB)")
