"""COCO evaluation without detectron2's compiled COCOeval: COCOEvaluator (through diffusioninst.compat, i.e.
faster-coco-eval) gives the same numbers as the official pycocotools COCOeval on the same predictions."""
from __future__ import annotations

import copy
import json
import math

import diffusioninst  # noqa: F401  (compat shims before detectron2)
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation
from detectron2.structures import Boxes, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from diffusioninst import compat
from diffusioninst.data import SHAPES_CATEGORIES, generate_shapes_dataset, shapes_dataset_paths

DATASET = "test_evaluation_shapes_val"
SIZE = 160
CLASS_NAMES = [c["name"] for c in SHAPES_CATEGORIES]
TO_CONTIGUOUS = {c["id"]: i for i, c in enumerate(SHAPES_CATEGORIES)}
FROM_CONTIGUOUS = {i: c for c, i in TO_CONTIGUOUS.items()}
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _polygon(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (run lengths in column-major order, starting with zeros), as crowd regions use."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


@pytest.fixture(scope="module")
def gt_json(tmp_path_factory) -> str:
    """Shapes val ground truth (small and medium instances, one empty image) plus a large box and a crowd region."""
    root = tmp_path_factory.mktemp("eval_data")
    generate_shapes_dataset(str(root), num_train=0, num_val=8, image_size=SIZE, seed=3)
    json_file, image_root = shapes_dataset_paths(str(root), "val")
    with open(json_file) as f:
        data = json.load(f)
    next_id = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"].append(
        {"id": next_id, "image_id": 2, "category_id": 2, "segmentation": _polygon(10, 12, 125, 130),
         "area": 115.0 * 118.0, "bbox": [10, 12, 115, 118], "iscrowd": 0}
    )
    crowd = np.zeros((SIZE, SIZE), np.uint8)
    crowd[90:150, 20:100] = 1
    data["annotations"].append(
        {"id": next_id + 1, "image_id": 3, "category_id": 1, "segmentation": _uncompressed_rle(crowd),
         "area": float(crowd.sum()), "bbox": [20, 90, 80, 60], "iscrowd": 1}
    )
    out = root / "instances_val_eval.json"
    out.write_text(json.dumps(data))
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)
    register_coco_instances(
        DATASET,
        {"thing_classes": CLASS_NAMES, "thing_dataset_id_to_contiguous_id": TO_CONTIGUOUS},
        str(out),
        image_root,
    )
    return str(out)


def _quarter(values: np.ndarray) -> np.ndarray:
    """Round to quarter pixels, so box arithmetic is exact in float32 and float64 alike."""
    return np.clip(np.round(np.asarray(values) * 4) / 4, 0, SIZE)


def fake_predictions(coco: COCO, seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """Per image: perturbed ground truth (some missed, some mislabelled or duplicated) plus false positives."""
    rng = np.random.default_rng(seed)
    preds = {}
    for image_id in sorted(coco.getImgIds()):
        boxes, masks, classes = [], [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            if ann["iscrowd"]:  # a detection inside a crowd region is ignored, not a false positive
                boxes.append(_quarter([25.3, 95.6, 70.1, 130.4]))
                mask = np.zeros((SIZE, SIZE), bool)
                mask[96:130, 26:70] = True
                masks.append(mask)
                classes.append(ann["category_id"])
                continue
            if rng.random() < 0.15:
                continue
            x, y, w, h = ann["bbox"]
            mask = coco.annToMask(ann).astype(bool)
            for duplicate in range(2 if rng.random() < 0.2 else 1):
                jitter = rng.normal(0, 0.08 * math.sqrt(w * h), 4)
                boxes.append(_quarter([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]]))
                dy, dx = rng.integers(-2, 3, 2)
                masks.append(np.roll(mask, (dy + duplicate, dx), axis=(0, 1)))
                label = ann["category_id"]
                if rng.random() < 0.15:  # mislabelled
                    label = int(rng.choice([c for c in TO_CONTIGUOUS if c != label]))
                classes.append(label)
        for _ in range(2):  # false positives: random ellipses
            cx, cy = rng.uniform(10, SIZE - 10, 2)
            ax, ay = rng.uniform(3, 30, 2)
            yy, xx = np.mgrid[:SIZE, :SIZE]
            masks.append(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1)
            boxes.append(_quarter([cx - ax, cy - ay, cx + ax, cy + ay]))
            classes.append(int(rng.choice(list(TO_CONTIGUOUS))))
        n = len(boxes)
        preds[image_id] = {
            "boxes": np.array(boxes, np.float32).reshape(n, 4),
            "masks": np.array(masks, bool).reshape(n, SIZE, SIZE),
            "classes": np.array(classes, np.int64),  # dataset ids
            "scores": rng.uniform(0.05, 1.0, n).astype(np.float32),
        }
    return preds


def reference_results(preds: dict[int, dict[str, np.ndarray]]) -> list[dict]:
    """The predictions as COCO results, built independently of detectron2."""
    results = []
    for image_id, p in preds.items():
        for box, mask, cls, score in zip(p["boxes"], p["masks"], p["classes"], p["scores"]):
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in box)
            results.append({"image_id": image_id, "category_id": int(cls), "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": float(score), "segmentation": rle})
    return results


def pycocotools_eval(json_file: str, results: list[dict], iou_type: str) -> COCOeval:
    """The official COCOeval, as detectron2 calls it (for segm, without boxes so that areas are mask areas)."""
    gt = COCO(json_file)
    results = copy.deepcopy(results)
    if iou_type == "segm":
        for r in results:
            r.pop("bbox")
    ev = COCOeval(gt, gt.loadRes(results), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev


def assert_same(a: float, b: float, what: str) -> None:
    """Equal to 1e-9 relative; -1 / nan (undefined) must agree too."""
    if math.isnan(a) or math.isnan(b):
        assert math.isnan(a) and math.isnan(b), f"{what}: {a} vs {b}"
    else:
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), f"{what}: {a} vs {b}"


def test_compat_routes_coco_evaluator_to_faster_coco_eval():
    if compat.HAS_COMPILED_OPS:
        pytest.skip("detectron2 has its compiled COCOeval; compat leaves COCOEvaluator alone")
    from faster_coco_eval import COCOeval_faster

    assert coco_evaluation.COCOeval_opt is COCOeval_faster


def test_coco_evaluator_equals_pycocotools(gt_json, monkeypatch):
    coco = COCO(gt_json)
    preds = fake_predictions(coco)
    expected = {t: pycocotools_eval(gt_json, reference_results(preds), t) for t in ("bbox", "segm")}

    used = {}
    original = coco_evaluation._evaluate_predictions_on_coco

    def spy(coco_gt, coco_results, iou_type, **kwargs):
        used[iou_type] = original(coco_gt, coco_results, iou_type, **kwargs)
        return used[iou_type]

    monkeypatch.setattr(coco_evaluation, "_evaluate_predictions_on_coco", spy)
    evaluator = COCOEvaluator(DATASET, output_dir=None, distributed=False)
    evaluator.reset()
    for image_id, p in preds.items():
        info = coco.loadImgs(image_id)[0]
        instances = Instances((info["height"], info["width"]))
        instances.pred_boxes = Boxes(torch.from_numpy(p["boxes"]))
        instances.scores = torch.from_numpy(p["scores"])
        instances.pred_classes = torch.tensor([TO_CONTIGUOUS[int(c)] for c in p["classes"]], dtype=torch.int64)
        instances.pred_masks = torch.from_numpy(p["masks"])
        evaluator.process([{"image_id": image_id, "height": info["height"], "width": info["width"]}],
                          [{"instances": instances}])
    results = evaluator.evaluate()

    assert set(results) == {"bbox", "segm"} and set(used) == {"bbox", "segm"}
    for task, ref in expected.items():
        ours = used[task]
        if not compat.HAS_COMPILED_OPS:
            assert type(ours).__module__.startswith("faster_coco_eval"), type(ours)
        stats = np.asarray(ref.stats)
        assert (stats[:12] > 0).all(), f"{task}: every metric should be defined and non-trivial: {stats}"
        for name, a, b in zip(STAT_NAMES, ours.stats[:12], stats):
            assert_same(float(a), float(b), f"{task} {name}")
        for name, b in zip(STAT_NAMES[:6], stats):
            assert_same(results[task][name], float(b) * 100, f"{task} COCOEvaluator {name}")
        for k, name in enumerate(CLASS_NAMES):
            precision = ref.eval["precision"][:, :, k, 0, -1]
            precision = precision[precision > -1]
            ap = float(np.mean(precision)) * 100 if precision.size else float("nan")
            assert_same(results[task][f"AP-{name}"], ap, f"{task} AP-{name}")
        np.testing.assert_allclose(ours.eval["precision"], ref.eval["precision"], rtol=1e-9, atol=0)
        np.testing.assert_allclose(ours.eval["recall"], ref.eval["recall"], rtol=1e-9, atol=0)
