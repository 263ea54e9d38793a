"""Tests of the data package: shapes generator, dataset registration and DiffusionInstDatasetMapper."""
import copy
import json
import os
import threading

import diffusioninst  # noqa: F401  (applies the detectron2 compatibility shims before detectron2 loads)

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BitMasks, BoxMode

from diffusioninst.data import (
    SHAPES_CATEGORIES,
    SHAPES_SPLITS,
    DiffusionInstDatasetMapper,
    build_diffusioninst_augmentation,
    generate_shapes_dataset,
    register_datasets_from_cfg,
    register_shapes,
    shapes_dataset_paths,
)

SIZE = 96
SMALL = dict(num_train=6, num_val=3, image_size=SIZE, seed=0)


def _read_tree(path):
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def _decode(segmentation, h=SIZE, w=SIZE):
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(segmentation, h, w)))


def _mask_bbox_xyxy(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    generate_shapes_dataset(root, **SMALL)
    return root


@pytest.fixture(scope="module")
def small_coco(small_root):
    coco = {}
    for split in ("train", "val"):
        with open(shapes_dataset_paths(small_root, split)[0]) as f:
            coco[split] = json.load(f)
    return coco


@pytest.fixture(scope="module")
def train_dicts(small_root):
    json_file, image_root = shapes_dataset_paths(small_root, "train")
    return load_coco_json(json_file, image_root)


def _cfg(**input_overrides):
    cfg = get_cfg()
    if "COCO_INSTANCES" not in cfg.DATASETS:
        cfg.DATASETS.COCO_INSTANCES = ()
    if "CROP_RESIZE_SIZES" not in cfg.INPUT:
        cfg.INPUT.CROP_RESIZE_SIZES = (400, 500, 600)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 1000
    cfg.INPUT.CROP.ENABLED = False
    for key, value in input_overrides.items():
        node = cfg.INPUT
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Shapes generator


def test_generation_is_deterministic(small_root, tmp_path):
    same = generate_shapes_dataset(str(tmp_path / "a"), **SMALL)
    other = generate_shapes_dataset(str(tmp_path / "b"), **{**SMALL, "seed": 1})
    reference = _read_tree(os.path.join(small_root, "shapes"))
    assert len(reference) == 6 + 3 + 2
    assert _read_tree(same) == reference
    changed = _read_tree(other)
    assert changed.keys() == reference.keys()
    assert changed["annotations/instances_train.json"] != reference["annotations/instances_train.json"]
    images = [k for k in reference if k.endswith(".png")]
    assert sum(changed[k] != reference[k] for k in images) == len(images)


def test_coco_layout_and_schema(small_root, small_coco):
    assert SHAPES_CATEGORIES == small_coco["train"]["categories"]
    assert [c["id"] for c in SHAPES_CATEGORIES] == [1, 2, 3, 4]
    assert len({c["name"] for c in SHAPES_CATEGORIES}) == 4
    for split, num_images in (("train", 6), ("val", 3)):
        coco = small_coco[split]
        _, image_root = shapes_dataset_paths(small_root, split)
        assert image_root == os.path.join(small_root, "shapes", split)
        assert len(coco["images"]) == num_images
        for image in coco["images"]:
            pixels = cv2.imread(os.path.join(image_root, image["file_name"]))
            assert pixels.shape == (image["height"], image["width"], 3) == (SIZE, SIZE, 3)
        image_ids = {im["id"] for im in coco["images"]}
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        for ann in coco["annotations"]:
            assert ann["image_id"] in image_ids
            assert ann["iscrowd"] == 0 and ann["category_id"] in (1, 2, 3, 4)
            assert ann["segmentation"] and all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE


def test_polygons_match_area_and_bbox(small_coco):
    num_anns = 0
    for coco in small_coco.values():
        for ann in coco["annotations"]:
            mask = _decode(ann["segmentation"])
            assert abs(int(mask.sum()) - ann["area"]) <= max(2.0, 0.02 * ann["area"])
            x, y, w, h = ann["bbox"]
            np.testing.assert_allclose(_mask_bbox_xyxy(mask), [x, y, x + w, y + h], atol=1.0)
            num_anns += 1
    assert num_anns >= 10


def test_visible_masks_are_disjoint_and_occlusion_happens(small_coco):
    touching_pairs = 0
    for coco in small_coco.values():
        masks_per_image = {}
        for ann in coco["annotations"]:
            masks_per_image.setdefault(ann["image_id"], []).append(_decode(ann["segmentation"]))
        for masks in masks_per_image.values():
            stacked = np.stack(masks).astype(np.int64)
            assert stacked.sum(axis=0).max() == 1, "visible masks of one image overlap"
            grown = [cv2.dilate(m, np.ones((3, 3), np.uint8)) for m in masks]
            touching_pairs += sum(
                bool((grown[i] & masks[j]).any()) for i in range(len(masks)) for j in range(i + 1, len(masks))
            )
    # Shapes that overlapped are now adjacent: one occludes the other, which keeps only its visible part.
    assert touching_pairs > 0


def test_empty_images_and_textured_backgrounds(small_root, small_coco):
    for split, coco in small_coco.items():
        counts = {im["id"]: 0 for im in coco["images"]}
        for ann in coco["annotations"]:
            counts[ann["image_id"]] += 1
        empty = [i for i, n in counts.items() if n == 0]
        assert empty, f"no image without instances in {split}"
        assert max(counts.values()) >= 2
        file_name = next(im["file_name"] for im in coco["images"] if im["id"] == empty[0])
        background = cv2.imread(os.path.join(small_root, "shapes", split, file_name)).astype(np.float32)
        # Structure larger than the per-pixel noise survives a blur: the background is not flat.
        assert cv2.GaussianBlur(background, (7, 7), 0).std(axis=(0, 1)).mean() > 4.0


def test_existing_dataset_is_reused_refused_or_replaced(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "shapes"))  # an empty directory counts as missing
    path = generate_shapes_dataset(root, **SMALL)
    json_file = shapes_dataset_paths(root, "train")[0]
    mtime = os.stat(json_file).st_mtime_ns
    assert generate_shapes_dataset(root, **SMALL) == path
    assert os.stat(json_file).st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_shapes_dataset(root, **{**SMALL, "seed": 5})
    with open(json_file, "rb") as f:
        before = f.read()
    generate_shapes_dataset(root, **{**SMALL, "seed": 5}, overwrite=True)
    with open(json_file, "rb") as f:
        assert f.read() != before
    assert os.listdir(root) == ["shapes"]  # no temporary directories left behind


def test_concurrent_generation_publishes_one_complete_dataset(tmp_path):
    root = str(tmp_path)
    barrier = threading.Barrier(4)
    results, errors = [], []

    def worker():
        barrier.wait()
        try:
            results.append(generate_shapes_dataset(root, **SMALL))
        except Exception as e:  # collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [os.path.join(root, "shapes")] * 4
    assert os.listdir(root) == ["shapes"]
    assert len(os.listdir(os.path.join(root, "shapes", "train"))) == 6


# ---------------------------------------------------------------------------------------------------------
# Registration


@pytest.fixture
def shapes_in_tmp_root(tmp_path, monkeypatch):
    """Re-register shapes_train/val under an empty $DETECTRON2_DATASETS; restore the originals afterwards."""
    original_root = os.path.dirname(os.path.dirname(MetadataCatalog.get("shapes_train").image_root))
    root = tmp_path / "datasets"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    for name in SHAPES_SPLITS:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_shapes()
    yield str(root)
    for name in SHAPES_SPLITS:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_shapes(original_root)


def test_shapes_are_registered_on_import():
    assert {"shapes_train", "shapes_val"} <= set(DatasetCatalog.list())
    register_shapes()  # a second call is a no-op
    assert MetadataCatalog.get("shapes_val").evaluator_type == "coco"


@pytest.mark.slow
def test_shapes_catalog_generates_on_first_get(shapes_in_tmp_root):
    root = shapes_in_tmp_root
    assert not os.path.exists(root), "registration must not generate anything"
    meta = MetadataCatalog.get("shapes_val")
    assert meta.json_file == os.path.join(root, "shapes", "annotations", "instances_val.json")
    assert meta.thing_classes == [c["name"] for c in SHAPES_CATEGORIES]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}

    dicts = DatasetCatalog.get("shapes_val")
    assert os.path.isfile(meta.json_file)
    assert os.path.isfile(MetadataCatalog.get("shapes_train").json_file)
    assert len(dicts) == 60
    anns = [a for d in dicts for a in d["annotations"]]
    assert anns and {a["category_id"] for a in anns} <= {0, 1, 2, 3}
    assert all(isinstance(a["segmentation"], list) and a["bbox_mode"] == BoxMode.XYWH_ABS for a in anns)
    assert any(not d["annotations"] for d in dicts)
    assert len(MetadataCatalog.get("shapes_val").thing_classes) == 4
    assert len(DatasetCatalog.get("shapes_train")) == 240


@pytest.fixture
def custom_names():
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_register_datasets_from_cfg(small_root, custom_names):
    json_file, image_root = shapes_dataset_paths(small_root, "train")
    val_json, val_root = shapes_dataset_paths(small_root, "val")
    custom_names += ["test_custom_train", "test_custom_val"]
    cfg = _cfg()
    cfg.merge_from_list(
        ["DATASETS.COCO_INSTANCES", repr((("test_custom_train", json_file, image_root),))]
    )
    assert register_datasets_from_cfg(cfg) == ["test_custom_train"]
    # YAML gives lists; the same name with the same files is skipped.
    cfg.DATASETS.COCO_INSTANCES = (
        ["test_custom_train", json_file, image_root],
        ["test_custom_val", val_json, val_root],
    )
    assert register_datasets_from_cfg(cfg) == ["test_custom_train", "test_custom_val"]

    dicts = DatasetCatalog.get("test_custom_train")
    assert len(dicts) == 6
    meta = MetadataCatalog.get("test_custom_train")
    assert meta.evaluator_type == "coco" and meta.image_root == image_root
    assert meta.thing_classes == [c["name"] for c in SHAPES_CATEGORIES]
    assert len(DatasetCatalog.get("test_custom_val")) == 3


def test_register_datasets_from_cfg_errors(small_root, tmp_path, custom_names):
    json_file, image_root = shapes_dataset_paths(small_root, "train")
    val_json, _ = shapes_dataset_paths(small_root, "val")
    custom_names.append("test_custom_a")
    cfg = _cfg()

    cfg.DATASETS.COCO_INSTANCES = (("test_custom_a", json_file),)
    with pytest.raises(ValueError, match=r"DATASETS\.COCO_INSTANCES\[0\].*triple"):
        register_datasets_from_cfg(cfg)
    cfg.DATASETS.COCO_INSTANCES = (("test_custom_a", json_file, image_root), ("test_custom_b", 1, image_root))
    with pytest.raises(ValueError, match=r"DATASETS\.COCO_INSTANCES\[1\]"):
        register_datasets_from_cfg(cfg)

    missing_json = str(tmp_path / "nope.json")
    cfg.DATASETS.COCO_INSTANCES = (("test_custom_missing", missing_json, image_root),)
    with pytest.raises(FileNotFoundError) as err:
        register_datasets_from_cfg(cfg)
    assert "DATASETS.COCO_INSTANCES" in str(err.value) and "test_custom_missing" in str(err.value)
    assert missing_json in str(err.value)

    missing_dir = str(tmp_path / "no_images")
    cfg.DATASETS.COCO_INSTANCES = (("test_custom_missing", json_file, missing_dir),)
    with pytest.raises(FileNotFoundError) as err:
        register_datasets_from_cfg(cfg)
    assert "DATASETS.COCO_INSTANCES" in str(err.value) and "test_custom_missing" in str(err.value)
    assert missing_dir in str(err.value)
    assert "test_custom_missing" not in DatasetCatalog.list()

    # Entries are all checked before any is registered.
    assert "test_custom_a" not in DatasetCatalog.list()
    cfg.DATASETS.COCO_INSTANCES = (
        ("test_custom_a", json_file, image_root),
        ("test_custom_a", val_json, image_root),
    )
    with pytest.raises(ValueError, match=r"\[1\].*test_custom_a.*already registered"):
        register_datasets_from_cfg(cfg)
    cfg.DATASETS.COCO_INSTANCES = (("test_custom_a", json_file, image_root),)
    register_datasets_from_cfg(cfg)
    cfg.DATASETS.COCO_INSTANCES = (("test_custom_a", val_json, image_root),)
    with pytest.raises(ValueError, match=r"test_custom_a.*already registered.*instances_train\.json"):
        register_datasets_from_cfg(cfg)


# ---------------------------------------------------------------------------------------------------------
# Dataset mapper


def test_mapper_train_resizes_and_keeps_masks_aligned(train_dicts):
    mapper = DiffusionInstDatasetMapper(_cfg(), is_train=True)
    np.random.seed(0)
    for d in train_dicts:
        original = copy.deepcopy(d)
        out = mapper(d)
        assert d == original, "the mapper must not modify its input"
        assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, 128, 128)
        inst = out["instances"]
        assert inst.image_size == (128, 128)
        assert isinstance(inst.gt_masks, BitMasks)
        assert tuple(inst.gt_masks.tensor.shape) == (len(d["annotations"]), 128, 128)
        assert sorted(inst.gt_classes.tolist()) == sorted(a["category_id"] for a in d["annotations"])
        # Each mask is its annotation's visible mask, resized (and flipped for the whole image, or not).
        full = [_decode(a["segmentation"]) for a in d["annotations"]]
        ious = []
        for mask, reference in zip(inst.gt_masks.tensor.numpy(), full):
            reference = cv2.resize(reference, (128, 128), interpolation=cv2.INTER_NEAREST).astype(bool)
            ious.append([(mask & r).sum() / (mask | r).sum() for r in (reference, reference[:, ::-1])])
        if ious:
            ious = np.array(ious)
            flipped = int(ious.mean(axis=0).argmax())
            assert ious[:, flipped].min() > 0.7 and ious[:, flipped].mean() > 0.85
        for box, mask in zip(inst.gt_boxes.tensor, inst.gt_masks.tensor):
            np.testing.assert_allclose(_mask_bbox_xyxy(mask.numpy()), box.numpy(), atol=2.0)


def test_mapper_exact_flip_and_crop_of_polygons_and_rle(train_dicts):
    d = next(d for d in train_dicts if len(d["annotations"]) >= 2)
    full = np.stack([_decode(a["segmentation"]) for a in d["annotations"]])
    image = utils.read_image(d["file_name"], format="RGB")
    rle_dict = copy.deepcopy(d)
    for ann in rle_dict["annotations"]:
        ann["segmentation"] = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], SIZE, SIZE))
    x0, y0, w, h = 10, 20, 50, 40
    cases = [
        (T.HFlipTransform(SIZE), full[:, :, ::-1], image[:, ::-1]),
        (T.CropTransform(x0, y0, w, h), full[:, y0 : y0 + h, x0 : x0 + w], image[y0 : y0 + h, x0 : x0 + w]),
    ]
    for transform, expected_masks, expected_image in cases:
        mapper = DiffusionInstDatasetMapper(True, augmentations=[transform], image_format="RGB")
        for source in (d, rle_dict):
            out = mapper(source)
            expected_chw = np.ascontiguousarray(expected_image.transpose(2, 0, 1))
            assert torch.equal(out["image"], torch.from_numpy(expected_chw))
            masks = out["instances"].gt_masks.tensor.numpy()
            keep = expected_masks.reshape(len(expected_masks), -1).any(axis=1)
            np.testing.assert_array_equal(masks, expected_masks[keep].astype(bool))


def test_mapper_test_mode(train_dicts):
    mapper = DiffusionInstDatasetMapper(_cfg(), is_train=False)
    out = mapper(train_dicts[1])
    assert tuple(out["image"].shape) == (3, 64, 64) and out["image"].dtype == torch.uint8
    assert "instances" not in out and "annotations" not in out
    assert (out["height"], out["width"]) == (SIZE, SIZE)


def test_mapper_keeps_images_without_instances(train_dicts):
    mapper = DiffusionInstDatasetMapper(_cfg(), is_train=True)
    empty = next(d for d in train_dicts if not d["annotations"])
    unlabeled = {k: v for k, v in train_dicts[1].items() if k != "annotations"}
    crowd_only = copy.deepcopy(train_dicts[1])
    for ann in crowd_only["annotations"]:
        ann["iscrowd"] = 1
    for d in (empty, unlabeled, crowd_only):
        inst = mapper(d)["instances"]
        assert len(inst) == 0
        assert tuple(inst.gt_boxes.tensor.shape) == (0, 4)
        assert tuple(inst.gt_classes.shape) == (0,)
        assert isinstance(inst.gt_masks, BitMasks) and tuple(inst.gt_masks.tensor.shape) == (0, 128, 128)


def test_crop_augmentation_takes_both_paths_in_the_original_order(train_dicts):
    crop = {"CROP.ENABLED": True, "CROP.TYPE": "absolute_range", "CROP.SIZE": (50, 80)}
    cfg = _cfg(**crop, CROP_RESIZE_SIZES=(120,))
    augs = T.AugmentationList(build_diffusioninst_augmentation(cfg, is_train=True))
    image = utils.read_image(train_dicts[1]["file_name"], format="RGB")
    cropped = plain = 0
    np.random.seed(0)
    for _ in range(40):
        aug_input = T.AugInput(image)
        kinds = [type(t) for t in augs(aug_input).transforms if not isinstance(t, T.NoOpTransform)]
        assert min(aug_input.image.shape[:2]) == 128
        if T.CropTransform in kinds:
            cropped += 1
            geometric = [k for k in kinds if k is not T.HFlipTransform]
            assert geometric == [T.ResizeTransform, T.CropTransform, T.ResizeTransform]
        else:
            plain += 1
            assert [k for k in kinds if k is not T.HFlipTransform] == [T.ResizeTransform]
        if T.HFlipTransform in kinds:
            assert kinds.index(T.HFlipTransform) == 0  # the original flips first
    assert cropped >= 10 and plain >= 10

    mapper = DiffusionInstDatasetMapper(cfg, is_train=True)
    for d in train_dicts:
        out = mapper(d)
        _, h, w = out["image"].shape
        inst = out["instances"]
        assert min(h, w) == 128 and tuple(inst.gt_masks.tensor.shape[1:]) == (h, w)
        assert len(inst) <= len(d["annotations"])
        assert bool(inst.gt_masks.nonempty().all()) and bool(inst.gt_boxes.nonempty().all())


def test_detectron2_bitmask_utilities():
    square = [[2.0, 2.0, 8.0, 2.0, 8.0, 6.0, 2.0, 6.0]]
    mask = utils.polygons_to_bitmask([np.array(p) for p in square], 10, 12)
    assert mask.shape == (10, 12) and mask.dtype == bool
    expected = np.zeros((10, 12), dtype=bool)
    expected[2:6, 2:8] = True
    np.testing.assert_array_equal(mask, expected)
    assert not utils.polygons_to_bitmask([], 10, 12).any()

    annos = [
        {"bbox": [2, 2, 6, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3, "segmentation": square},
        {
            "bbox": [0, 0, 3, 3],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 1,
            "segmentation": [[0, 0, 3, 0, 0, 3]],
        },
    ]
    inst = utils.annotations_to_instances(annos, (10, 12), mask_format="bitmask")
    assert isinstance(inst.gt_masks, BitMasks) and tuple(inst.gt_masks.tensor.shape) == (2, 10, 12)
    assert inst.gt_classes.tolist() == [3, 1]
    assert inst.gt_boxes.tensor.tolist() == [[2, 2, 8, 6], [0, 0, 3, 3]]
    assert inst.gt_masks.tensor[0].sum().item() == 24
    assert inst.gt_masks.get_bounding_boxes().tensor[0].tolist() == [2, 2, 8, 6]
