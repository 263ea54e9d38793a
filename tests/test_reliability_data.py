"""Bad dataset input: a clear error naming the file and the entry before training, or a documented repair.

Covers the validating loaders installed by ``register_datasets_from_cfg`` (diffusioninst/data/validation.py),
the mapper's image reading (corrupt, grayscale, RGBA, 16-bit, EXIF-rotated) and tiny/empty/extreme images in
training and inference.
"""
from __future__ import annotations

import json
import logging
import re
import os

import diffusioninst  # noqa: F401  (compatibility shims before detectron2)

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data import detection_utils as utils
from detectron2.data.datasets import load_coco_json
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

from conftest import tiny_cfg
from diffusioninst.data import (
    SHAPES_SPLITS,
    DatasetValidationError,
    DiffusionInstDatasetMapper,
    ImageReadError,
    generate_shapes_dataset,
    read_image,
    register_datasets_from_cfg,
    register_shapes,
    shapes_dataset_paths,
)

CATEGORIES = [{"id": i + 1, "name": n} for i, n in enumerate(["circle", "square", "triangle", "star"])]
W, H = 64, 48
RECT = (8, 10, 40, 30)  # x0, y0, x1, y1 of the drawn shape


# ---------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def log():
    """Records of the diffusioninst.data loggers (a handler of their own: tools may stop propagation)."""
    records: list[logging.LogRecord] = []

    class Handler(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, target = Handler(logging.WARNING), logging.getLogger("diffusioninst.data")
    target.addHandler(handler)
    yield records
    target.removeHandler(handler)


def _messages(records) -> str:
    return "\n".join(r.getMessage() for r in records)


def _draw(path, size=(W, H), rect=RECT, fg=(200, 40, 30), bg=(20, 90, 160), mode="RGB", exif=None, **save):
    image = Image.new("RGB", size, bg)
    image.paste(Image.new("RGB", (rect[2] - rect[0], rect[3] - rect[1]), fg), rect[:2])
    image = image.convert(mode) if mode != "RGB" else image
    if exif is not None:
        save["exif"] = exif
    image.save(path, **save)
    return path


def _polygon(rect=RECT):
    x0, y0, x1, y1 = rect
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _ann(ann_id, image_id, category_id=1, rect=RECT, **over):
    x0, y0, x1, y1 = rect
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
           "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "segmentation": _polygon(rect)}
    ann.update(over)
    return ann


def _dataset(tmp_path, n=3, name="data", draw=True):
    """A valid COCO dict with n images (drawn under tmp_path/name/) and one annotation each."""
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    images = []
    for i in range(1, n + 1):
        images.append({"id": i, "file_name": f"{i:03d}.png", "height": H, "width": W})
        if draw:
            _draw(root / f"{i:03d}.png")
    return {"images": images, "annotations": [_ann(i, i) for i in range(1, n + 1)], "categories": list(CATEGORIES)}


def _write(tmp_path, coco, name="data"):
    json_file = tmp_path / f"{name}.json"
    if isinstance(coco, bytes):
        json_file.write_bytes(coco)
    else:
        json_file.write_text(coco if isinstance(coco, str) else json.dumps(coco))
    (tmp_path / name).mkdir(exist_ok=True)
    return str(json_file), str(tmp_path / name)


@pytest.fixture
def registry():
    """Registers COCO files through the config as training/test datasets; removes them afterwards."""
    names = []

    def register(tmp_path, train=None, test=None, *opts):
        entries, cfg_train, cfg_test = [], [], []
        for role, datasets in (("train", train or {}), ("test", test or {})):
            for name, coco in datasets.items():
                json_file, image_root = _write(tmp_path, coco, name)
                entries.append((f"rel_{name}", json_file, image_root))
                (cfg_train if role == "train" else cfg_test).append(f"rel_{name}")
                names.append(f"rel_{name}")
        cfg = tiny_cfg("DATASETS.TRAIN", tuple(cfg_train), "DATASETS.TEST", tuple(cfg_test), *opts)
        cfg.DATASETS.COCO_INSTANCES = tuple(entries)
        register_datasets_from_cfg(cfg)
        return cfg

    yield register
    for name in set(names):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


# ---------------------------------------------------------------------------------------------------------
# Annotation files


def test_missing_json_or_image_root_names_entry_and_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "a.json").write_text("{}")
    cfg = tiny_cfg("DATASETS.TRAIN", "()", "DATASETS.TEST", "()")
    cases = [
        (("rel_x", "missing.json", "images"), r"COCO_INSTANCES\[0\]: json file of dataset 'rel_x' not found: "
                                              r"missing\.json \(relative to the working directory .+\)"),
        (("rel_x", "images", "images"), r"json file of dataset 'rel_x' is a directory"),
        (("rel_x", "a.json", "imgs"), r"image directory of dataset 'rel_x' not found: imgs \(relative"),
    ]
    for entry, pattern in cases:
        cfg.DATASETS.COCO_INSTANCES = (entry,)
        with pytest.raises(FileNotFoundError, match=pattern):
            register_datasets_from_cfg(cfg)
    assert "rel_x" not in DatasetCatalog.list()


NOT_COCO = [
    (b"", r"is empty \(0 bytes\)"),
    (b'{"images": [{"id": 1, ', r"not valid JSON: .* line 1 column \d+ \(it ends early"),
    (b'{"images": [], oops}', r"not valid JSON: Expecting property name .* line 1 column 16"),
    (b"\xff\xd8\xff\xe0JFIF", r"not UTF-8 text"),
    (b'[{"image_id": 1, "score": 0.9}]', r"found a JSON list \(a list: a results/predictions file"),
    (b'{"annotations": [], "categories": []}', r"no 'images' list \(top-level keys: 'annotations', 'categories'\)"),
]


@pytest.mark.parametrize("content,pattern", NOT_COCO, ids=["empty", "truncated", "syntax", "binary", "list",
                                                           "no-images"])
def test_files_that_are_not_coco_json(tmp_path, registry, content, pattern):
    registry(tmp_path, train={"bad": content})
    with pytest.raises(DatasetValidationError, match=pattern) as err:
        DatasetCatalog.get("rel_bad")
    assert "dataset 'rel_bad'" in str(err.value) and str(tmp_path / "bad.json") in str(err.value)


def _without(coco, key):
    return {k: v for k, v in coco.items() if k != key}


MALFORMED = [
    (lambda c: _without(c, "categories"), r"no 'categories' list"),
    (lambda c: _without(c, "annotations"), r"no 'annotations' list \(a training set needs instance annotations\)"),
    (lambda c: {**c, "categories": []}, r"'categories' is empty"),
    (lambda c: {**c, "images": []}, r"'images' is empty"),
    (lambda c: {**c, "annotations": []}, r"no usable instance annotation: it has none"),
    (lambda c: {**c, "images": [_without(c["images"][0], "width")] + c["images"][1:]},
     r"images\[0\] \(id 1\) \(001\.png\) has no positive integer 'width'"),
    (lambda c: {**c, "images": c["images"] + [c["images"][0]]}, r"images\[3\] \(id 1\) \(001\.png\) repeats the id"),
    (lambda c: {**c, "annotations": c["annotations"] + [_ann(2, 3)]},
     r"annotation id 2 is used twice \(annotations\[1\] and annotations\[3\]\)"),
    (lambda c: {**c, "annotations": [_without(c["annotations"][0], "image_id")]},
     r"annotations\[0\] \(id 1\) has no 'image_id'"),
]


@pytest.mark.parametrize("edit,pattern", MALFORMED, ids=["no-categories", "no-annotations", "empty-categories",
                                                         "empty-images", "empty-annotations", "no-width",
                                                         "dup-image", "dup-ann", "no-image-id"])
def test_malformed_coco_entries(tmp_path, registry, edit, pattern):
    registry(tmp_path, train={"bad": edit(_dataset(tmp_path, name="bad"))})
    with pytest.raises(DatasetValidationError, match=pattern):
        DatasetCatalog.get("rel_bad")


def test_image_info_file_is_a_valid_test_set(tmp_path, registry):
    """COCO test-dev style: no "annotations"; fine for evaluation/inference, not for training."""
    cfg = registry(tmp_path, train={"tr": _dataset(tmp_path, name="tr")},
                   test={"info": _without(_dataset(tmp_path, name="info"), "annotations")})
    records = DatasetCatalog.get("rel_info")
    assert len(records) == 3 and all(r["annotations"] == [] for r in records)
    assert cfg.DATASETS.TEST == ("rel_info",)


def test_annotation_of_missing_image_id_and_unknown_category(tmp_path, registry, log):
    coco = _dataset(tmp_path, name="refs")
    coco["annotations"] += [_ann(10, 99), _ann(11, 2, category_id=7)]
    registry(tmp_path, train={"refs": coco})
    with pytest.raises(DatasetValidationError,
                       match=r"1 annotation\(s\) refer to image ids not in 'images', e\.g\. annotation id 10 with "
                             r"image_id 99.*SKIP_INVALID True"):
        DatasetCatalog.get("rel_refs")
    del coco["annotations"][3]
    registry(tmp_path, train={"refs": coco})
    with pytest.raises(DatasetValidationError,
                       match=r"category_id not in 'categories' \(ids \[1, 2, 3, 4\]\), e\.g\. annotation id 11 of "
                             r"002\.png with category_id 7"):
        DatasetCatalog.get("rel_refs")

    coco["annotations"].append(_ann(10, 99))
    registry(tmp_path, {"refs": coco}, None, "DATASETS.SKIP_INVALID", True)
    records = DatasetCatalog.get("rel_refs")
    assert [len(r["annotations"]) for r in records] == [1, 1, 1]
    text = _messages(log)
    assert "annotation id 10 refers to image_id 99, which is not in 'images'; annotation dropped" in text
    assert "annotation id 11 of 002.png has category_id 7, not in 'categories'; annotation dropped" in text


def test_image_files_missing_on_disk(tmp_path, registry, log):
    coco = _dataset(tmp_path, n=4, name="files")
    os.remove(tmp_path / "files" / "003.png")
    registry(tmp_path, train={"files": coco})
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 images it lists are missing on disk, e\.g\. "
                                                r".*files/003\.png.*SKIP_INVALID True.*CHECK_IMAGE_FILES False"):
        DatasetCatalog.get("rel_files")

    registry(tmp_path, {"files": coco}, None, "DATASETS.SKIP_INVALID", True)
    records = DatasetCatalog.get("rel_files")
    assert [r["image_id"] for r in records] == [1, 2, 4]
    assert "files/003.png (image id 3) is missing; image dropped" in _messages(log)

    registry(tmp_path, {"files": coco}, None, "DATASETS.CHECK_IMAGE_FILES", False)
    assert len(DatasetCatalog.get("rel_files")) == 4

    for i in (1, 2, 4):
        os.remove(tmp_path / "files" / f"{i:03d}.png")
    registry(tmp_path, {"files": coco}, None, "DATASETS.SKIP_INVALID", True)
    with pytest.raises(FileNotFoundError, match=r"none of the 4 images it lists is under image_root .*files "
                                                r"\(e\.g\. .*001\.png.*\); is image_root right\?"):
        DatasetCatalog.get("rel_files")


def test_unusable_annotations_are_dropped_with_a_warning(tmp_path, registry, log):
    coco = _dataset(tmp_path, n=1, name="geom")
    nan = float("nan")
    rle = {"counts": "PPYo1", "size": [H + 1, W]}
    bad = {
        2: dict(bbox=[8, 10, 0, 20]),  # zero width
        3: dict(bbox=[8, 10, nan, 20]),
        4: dict(segmentation=[]),
        5: dict(segmentation=[[8, 10, 40, 10]]),  # 2 points
        6: dict(segmentation=[[8, 10, 40, 10, 40, 30, 8]]),  # odd count
        7: dict(segmentation=[[8, 10, 40, nan, 40, 30, 8, 30]]),
        8: dict(segmentation=None),
        9: dict(segmentation=rle),
        10: dict(bbox=[100, 10, 5, 5]),  # right of the 64-pixel-wide image
        11: dict(bbox=[8, 10, 32]),
    }
    coco["annotations"] += [_ann(i, 1, **over) for i, over in bad.items()]
    partial = _ann(12, 1, segmentation=_polygon() + [[1, 2, 3, 4]])
    coco["annotations"] += [partial, _ann(13, 1, segmentation=_polygon((0, 0, 4, 4)) + _polygon())]
    # JSON cannot hold NaN in strict mode, but Python's json (and many exporters) write it.
    registry(tmp_path, train={"geom": coco})
    (record,) = DatasetCatalog.get("rel_geom")
    assert len(record["annotations"]) == 3
    assert record["annotations"][1]["segmentation"] == _polygon()  # the short polygon is dropped, the rest kept
    assert len(record["annotations"][2]["segmentation"]) == 2
    text = _messages(log)
    where = f"dataset 'rel_geom' ({tmp_path / 'geom.json'})"
    expected = {
        2: "degenerate bbox [8, 10, 0, 20] (width 0, height 20)",
        3: "bbox [8, 10, nan, 20] has NaN or infinite values",
        4: "has no segmentation",
        5: "has no valid polygon (polygon 0 has 4 coordinates (needs an even number, at least 6: 3 points))",
        6: "has no valid polygon (polygon 0 has 7 coordinates",
        7: "has no valid polygon (polygon 0 has NaN or infinite coordinates)",
        8: "has no segmentation",
        9: "has an RLE segmentation of size [49, 64], the image is [height, width] [48, 64]",
    }
    for ann_id, reason in expected.items():
        assert f"{where}: annotation id {ann_id} of 001.png: {reason}" in text, ann_id
    assert "annotation id 10 of 001.png: bbox [100, 10, 5, 5] lies outside the 64x48 image" in text
    assert "problems in all (10 unusable annotations, 1 invalid polygons); only the first 10" in text


def test_every_annotation_unusable_fails_a_training_set(tmp_path, registry):
    coco = _dataset(tmp_path, n=2, name="none")
    for ann in coco["annotations"]:
        ann["bbox"] = [1, 1, 0, 0]
    registry(tmp_path, train={"none": coco})
    with pytest.raises(DatasetValidationError, match=r"no usable instance annotation: all 2 were dropped"):
        DatasetCatalog.get("rel_none")


def test_num_classes_must_match_the_categories(tmp_path, registry):
    three = _dataset(tmp_path, name="three")
    three["categories"] = three["categories"][:3]
    registry(tmp_path, train={"three": three})  # tiny_cfg: NUM_CLASSES 4
    with pytest.raises(DatasetValidationError,
                       match=r"dataset 'rel_three' \(.*three\.json\) has 3 categories but "
                             r"MODEL\.DiffusionInst\.NUM_CLASSES is 4; set MODEL\.DiffusionInst\.NUM_CLASSES 3"):
        DatasetCatalog.get("rel_three")
    # A test set that disagrees fails when the training set is loaded, before the first iteration.
    five = _dataset(tmp_path, name="five")
    five["categories"].append({"id": 5, "name": "moon"})
    registry(tmp_path, train={"four": _dataset(tmp_path, name="four")}, test={"five": five})
    with pytest.raises(DatasetValidationError, match=r"'rel_five' .* has 5 categories but .*NUM_CLASSES is 4"):
        DatasetCatalog.get("rel_four")


def test_python_registered_dataset_records_are_checked(tmp_path, log):
    _draw(tmp_path / "a.png")
    good = {"file_name": str(tmp_path / "a.png"), "height": H, "width": W, "image_id": 1, "annotations": [
        {"bbox": [8, 10, 40, 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "segmentation": _polygon()},
        {"bbox": [8, 10, 8, 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1, "segmentation": _polygon(),
         "id": 5},
        {"bbox": [8, 10, 40, 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 6, "segmentation": _polygon()},
    ]}
    missing = {**good, "file_name": str(tmp_path / "gone.png"), "image_id": 2}
    DatasetCatalog.register("rel_py", lambda: [good, missing])
    MetadataCatalog.get("rel_py").thing_classes = ["a", "b", "c", "d"]
    try:
        cfg = tiny_cfg("DATASETS.TRAIN", "('rel_py',)", "DATASETS.TEST", "()")
        register_datasets_from_cfg(cfg)
        with pytest.raises(DatasetValidationError, match=r"dataset 'rel_py': annotation 2 of .*a\.png has category "
                                                         r"id 6, outside \[0, 4\) \(MODEL\.DiffusionInst\.NUM_CLASSES\)"):
            DatasetCatalog.get("rel_py")
        cfg.DATASETS.SKIP_INVALID = True
        register_datasets_from_cfg(cfg)  # re-wraps the original loader, not the wrapper
        (record,) = DatasetCatalog.get("rel_py")
        assert len(record["annotations"]) == 1 and len(good["annotations"]) == 3  # the input is not modified
        text = _messages(log)
        assert "annotation 1 (id 5) of " in text and "degenerate bbox [8, 10, 8, 30] (width 0, height 20)" in text
        assert "gone.png is missing; image dropped" in text
    finally:
        DatasetCatalog.remove("rel_py")
        MetadataCatalog.remove("rel_py")


def test_shapes_pass_validation_unchanged(tmp_path, log):
    """The generated dataset (images without instances included) loads through the checks like load_coco_json."""
    saved = {name: (DatasetCatalog[name], MetadataCatalog.get(name)) for name in SHAPES_SPLITS}
    root = str(tmp_path / "datasets")
    generate_shapes_dataset(root, num_train=12, num_val=3, image_size=64, seed=1)
    try:
        for name in SHAPES_SPLITS:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_shapes(root)
        register_datasets_from_cfg(tiny_cfg())
        records = DatasetCatalog.get("shapes_train")
        assert records == load_coco_json(*shapes_dataset_paths(root, "train"), "shapes_train")
        assert any(not r["annotations"] for r in records)
        assert not log
    finally:
        for name, (loader, meta) in saved.items():
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, loader)
            MetadataCatalog.remove(name)
            MetadataCatalog[name] = meta


# ---------------------------------------------------------------------------------------------------------
# Images


def _mapper(is_train=True, image_format="RGB", skip_invalid=False):
    return DiffusionInstDatasetMapper(is_train=is_train, augmentations=[], image_format=image_format,
                                      skip_invalid=skip_invalid)


def _record(path, width=W, height=H, annotations=None):
    anns = annotations if annotations is not None else [
        {"bbox": [8, 10, 32, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "segmentation": _polygon()}]
    return {"file_name": str(path), "height": height, "width": width, "image_id": 7, "annotations": anns}


@pytest.fixture
def broken_images(tmp_path):
    _draw(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("name", ["truncated.jpg", "text.jpg", "empty.png", "deleted.png"])
def test_unreadable_image_is_named(broken_images, name):
    path = broken_images / name
    with pytest.raises(ImageReadError, match=rf"cannot read image {re.escape(str(path))} \(image id 7\): \w+.*replace "
                                             r"it or remove it from the dataset or set DATASETS\.SKIP_INVALID True"):
        _mapper()(_record(path))
    with pytest.raises(ImageReadError, match=r"remove it from the dataset$"):  # inference: never skipped
        _mapper(is_train=False, skip_invalid=True)(_record(path))


def test_unreadable_images_are_skipped_in_training_with_the_switch(broken_images, log):
    mapper = _mapper(skip_invalid=True)
    assert mapper(_record(broken_images / "truncated.jpg")) is None
    assert f"cannot read image {broken_images / 'truncated.jpg'}" in _messages(log)
    records = [_record(broken_images / n) for n in ("ok.jpg", "truncated.jpg", "text.jpg")]
    records[0]["image_id"] = 1
    loader = build_detection_train_loader(records, mapper=mapper, total_batch_size=2, num_workers=0,
                                          aspect_ratio_grouping=False)
    seen = [x["image_id"] for batch, _ in zip(loader, range(4)) for x in batch]
    assert seen == [1] * 8
    assert len(log) == 2  # one warning per bad file, not per attempt


def _mask_iou(mask, image_rgb):
    shape = (image_rgb[..., 0].astype(int) - image_rgb[..., 2].astype(int)) > 80  # the reddish rectangle
    return (mask & shape).sum() / (mask | shape).sum()


def test_exif_rotated_image_and_annotation_agree(tmp_path):
    """Stored rotated with EXIF orientation 6: read upright (as annotated); the mask lands on the shape."""
    _draw(tmp_path / "upright.png")
    upright = Image.open(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[274] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.ROTATE_90).save(tmp_path / "phone.jpg", exif=exif, quality=98)
    assert Image.open(tmp_path / "phone.jpg").size == (H, W)

    out = _mapper()(_record(tmp_path / "phone.jpg"))
    image = out["image"].permute(1, 2, 0).numpy()
    assert image.shape == (H, W, 3)
    mask = out["instances"].gt_masks.tensor[0].numpy()
    assert _mask_iou(mask, image) > 0.9

    # Annotated on the stored pixels instead: the size check says what is wrong.
    with pytest.raises(utils.SizeMismatchError, match=r"phone\.jpg.*EXIF orientation 6.*stored 48x64, read 64x48"):
        _mapper()(_record(tmp_path / "phone.jpg", width=H, height=W))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_image_modes_load_as_three_channels(tmp_path, mode, image_format):
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    if mode == "I;16":  # 16-bit grayscale: 60000 on 10000
        array = np.full((H, W), 10000, np.uint16)
        array[RECT[1]:RECT[3], RECT[0]:RECT[2]] = 60000
        Image.fromarray(array).save(path)
        assert Image.open(path).mode in ("I;16", "I")
        expected_fg, expected_bg = (233,) * 3, (39,) * 3
    else:
        _draw(path, mode=mode, **({"quality": 100} if mode == "CMYK" else {}))
        reference = Image.open(path).convert("RGB")
        expected_fg, expected_bg = reference.getpixel((RECT[0] + 5, RECT[1] + 5)), reference.getpixel((2, 2))
    image = read_image(str(path), image_format)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    rgb = image[..., ::-1] if image_format == "BGR" else image
    np.testing.assert_allclose(rgb[RECT[1] + 5, RECT[0] + 5], expected_fg, atol=1)
    np.testing.assert_allclose(rgb[2, 2], expected_bg, atol=1)
    if mode == "RGBA":
        np.testing.assert_array_equal(rgb[2, 2], (20, 90, 160))

    out = _mapper(image_format=image_format)(_record(path))
    assert out["image"].shape == (3, H, W)
    mask = out["instances"].gt_masks.tensor[0].numpy()
    assert mask[RECT[1]:RECT[3], RECT[0]:RECT[2]].all() and mask.sum() == (RECT[2] - RECT[0]) * (RECT[3] - RECT[1])


# ---------------------------------------------------------------------------------------------------------
# Tiny, empty and extreme images through the model


def test_tiny_empty_and_extreme_images_train_and_infer(tmp_path):
    """20x20, no instances, 600x40: a training step (also on a batch without instances) and inference work."""
    sizes = {"tiny": (20, 20), "empty": (64, 48), "wide": (600, 40)}
    records = []
    for name, (w, h) in sizes.items():
        rect = (2, 3, min(w, 15), min(h, 14))
        _draw(tmp_path / f"{name}.png", size=(w, h), rect=rect)
        anns = [] if name == "empty" else [{"bbox": [2, 3, rect[2] - 2, rect[3] - 3], "bbox_mode": BoxMode.XYWH_ABS,
                                            "category_id": 1, "segmentation": _polygon(rect)}]
        records.append(_record(tmp_path / f"{name}.png", width=w, height=h, annotations=anns))

    torch.manual_seed(0)
    small = ("MODEL.DiffusionInst.NUM_PROPOSALS", 8, "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", 96)
    cfg = tiny_cfg(*small)
    model = build_model(cfg)
    mapper = DiffusionInstDatasetMapper(cfg, is_train=True)
    batch = [mapper(r) for r in records]
    assert tuple(batch[0]["image"].shape[1:]) == (64, 64)  # upscaled to MIN_SIZE_TRAIN
    assert tuple(batch[2]["image"].shape[1:]) == (6, 96)  # capped by MAX_SIZE_TRAIN: smaller than the stride
    assert len(batch[1]["instances"]) == 0 and len(batch[2]["instances"]) == 1
    model.train()
    for inputs in (batch, [batch[1]]):  # mixed, and a batch without a single instance
        losses = model(inputs)
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # Inference at the original size (MIN_SIZE_TEST 0: no resize), on inputs smaller than the backbone stride.
    model.eval()
    test_mapper = DiffusionInstDatasetMapper(tiny_cfg(*small, "INPUT.MIN_SIZE_TEST", 0), is_train=False)
    inputs = [test_mapper(r) for r in records]
    assert tuple(inputs[0]["image"].shape) == (3, 20, 20)
    with torch.no_grad():
        outputs = model(inputs)
    for out, (w, h) in zip(outputs, sizes.values()):
        instances = out["instances"]
        assert instances.image_size == (h, w)
        assert instances.pred_masks.shape[1:] == (h, w)
        assert torch.isfinite(instances.pred_boxes.tensor).all()


# ---------------------------------------------------------------------------------------------------------
# What training will actually use, checked before the first iteration


def test_a_training_set_of_crowd_regions_only_is_refused(tmp_path, registry):
    coco = _dataset(tmp_path, name="crowd")
    for ann in coco["annotations"]:
        ann["iscrowd"] = 1
    registry(tmp_path, train={"crowd": coco})
    with pytest.raises(DatasetValidationError, match=r"no usable instance annotation: all 3 are crowd regions"):
        DatasetCatalog.get("rel_crowd")


def test_crowd_regions_do_not_count_as_instances_in_other_loaders(tmp_path, log):
    from diffusioninst.data import validate_records
    from diffusioninst.data.validation import ValidationOptions

    path = _draw(tmp_path / "a.png")
    record = _record(path)
    record["annotations"][0]["iscrowd"] = 1
    with pytest.raises(DatasetValidationError, match="crowd regions are not instances"):
        validate_records([record], "crowd_records", ValidationOptions(num_classes=4))


@pytest.mark.parametrize("problem, pattern", [
    ("corrupt", r"image .*002\.png is not a readable image"),
    ("size", r"image .*002\.png is 64x48 pixels but the dataset declares width 80, height 48"),
])
def test_a_bad_validation_image_stops_training_before_it_starts(tmp_path, registry, problem, pattern):
    """Loading the training set also checks the test sets' image headers: a corrupt or mis-sized val image is named
    before the first iteration, not after the whole training."""
    val = _dataset(tmp_path, name="hval")
    if problem == "corrupt":
        (tmp_path / "hval" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    else:
        val["images"][1]["width"] = 80
    registry(tmp_path, {"htrain": _dataset(tmp_path, name="htrain")}, {"hval": val})
    with pytest.raises(DatasetValidationError, match=pattern):
        DatasetCatalog.get("rel_htrain")


def test_bad_image_headers_are_dropped_with_the_switch(tmp_path, registry, log):
    coco = _dataset(tmp_path, n=3, name="hskip")
    (tmp_path / "hskip" / "003.png").write_text("not an image")
    registry(tmp_path, {"hskip": coco}, None, "DATASETS.SKIP_INVALID", True)
    records = DatasetCatalog.get("rel_hskip")
    assert [os.path.basename(r["file_name"]) for r in records] == ["001.png", "002.png"]
    assert "003.png (image id 3) is not a readable image" in _messages(log)


def test_exif_rotated_headers_match_their_declared_size(tmp_path, registry):
    coco = _dataset(tmp_path, n=1, name="hexif")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48x64, shown (and declared) 64x48
    _draw(tmp_path / "hexif" / "001.png", size=(H, W), rect=(4, 4, 20, 30), exif=exif)
    registry(tmp_path, {"hexif": coco})
    assert len(DatasetCatalog.get("rel_hexif")) == 1
