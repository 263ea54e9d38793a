"""LVIS end to end: the LVIS-format shapes fixture, LVIS metrics equal to the lvis package's LVISEval, the evaluator,
--eval-only with only a val json, and training with the federated loss and repeat-factor sampling."""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from conftest import CONFIGS, ROOT, TINY_OPTS
from diffusioninst.data import (
    SHAPES_LVIS_FREQUENCY, generate_shapes_dataset, register_lvis_format, shapes_lvis_paths, write_shapes_lvis,
)
from diffusioninst.evaluation import LVIS_METRICS, LVISEvaluator, evaluate_lvis_predictions

TRAIN_NET = str(ROOT / "tools" / "train_net.py")
LVIS_CONFIG = str(CONFIGS / "diffinst.shapes-lvis.res18.cpu.yaml")
SIZE = 128


@pytest.fixture(scope="module")
def lvis_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("lvis_shapes"))
    generate_shapes_dataset(root, num_train=48, num_val=24, image_size=SIZE, seed=1)
    write_shapes_lvis(root)
    return root


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_fixture_is_lvis_v1_format_with_a_long_tail(lvis_root):
    train, val = (_load(shapes_lvis_paths(lvis_root, s)[0]) for s in ("train", "val"))
    cats = {c["name"]: c for c in train["categories"]}
    assert {n: c["frequency"] for n, c in cats.items()} == SHAPES_LVIS_FREQUENCY
    assert cats["star"]["image_count"] < cats["triangle"]["image_count"] < cats["circle"]["image_count"]
    for data in (train, val):
        assert all({"coco_url", "neg_category_ids", "not_exhaustive_category_ids"} <= set(i) for i in data["images"])
        assert all("iscrowd" not in a for a in data["annotations"])
        for img in data["images"]:  # a class is positive, negative or unknown, never two of them
            present = {a["category_id"] for a in data["annotations"] if a["image_id"] == img["id"]}
            assert not present & set(img["neg_category_ids"])
            assert set(img["not_exhaustive_category_ids"]) <= present
    # val meets all three per-image category states, train has unknown (dropped) classes
    assert any(i["not_exhaustive_category_ids"] for i in val["images"])
    assert any(len(i["neg_category_ids"]) + len({a["category_id"] for a in val["annotations"] if a["image_id"] == i["id"]})
               < 4 for i in val["images"])
    assert len(train["annotations"]) < len(_load(os.path.join(lvis_root, "shapes", "annotations",
                                                              "instances_train.json"))["annotations"])


def _fake_results(gt: dict, seed: int = 0) -> list:
    """Detections near the ground truth (some with the wrong class, some shifted), plus false positives of every
    class in every image, and more than 300 on one image so the per-image cap matters."""
    rng = np.random.default_rng(seed)
    sizes = {i["id"]: (i["height"], i["width"]) for i in gt["images"]}
    results = []
    for ann in gt["annotations"]:
        h, w = sizes[ann["image_id"]]
        mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(ann["segmentation"], h, w)))
        for k in range(3):
            x, y, bw, bh = ann["bbox"]
            j = rng.normal(0, 2.5, 4)
            m = np.roll(mask, int(rng.integers(-3, 4)), axis=1) if k else mask
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": ann["image_id"], "category_id": ann["category_id"] if k < 2 else int(rng.integers(1, 5)),
                            "bbox": [x + j[0], y + j[1], max(1.0, bw + j[2]), max(1.0, bh + j[3])],
                            "score": float(rng.random()), "segmentation": rle})
    square = np.zeros((SIZE, SIZE), np.uint8)
    square[10:40, 10:40] = 1
    rle = mask_util.encode(np.asfortranarray(square))
    rle["counts"] = rle["counts"].decode()
    for img in gt["images"]:
        for cat in range(1, 5):
            results.append({"image_id": img["id"], "category_id": cat, "bbox": [10.0, 10.0, 30.0, 30.0],
                            "score": float(rng.random()) * 0.5, "segmentation": rle})
    crowded = gt["annotations"][0]["image_id"]
    for _ in range(320):
        results.append({"image_id": crowded, "category_id": int(rng.integers(1, 5)), "bbox": [5.0, 5.0, 20.0, 20.0],
                        "score": float(rng.random()) * 0.3, "segmentation": rle})
    return results


@pytest.mark.filterwarnings("ignore:The .warn. method is deprecated:DeprecationWarning")
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_metrics_equal_the_lvis_package(lvis_root, iou_type, monkeypatch):
    """Our LVIS metrics (faster-coco-eval) against the lvis package's own LVISEval, to 1e-6."""
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3 still uses the alias numpy 1.24 removed
    from faster_coco_eval import COCO
    from lvis import LVIS, LVISEval, LVISResults

    json_file = shapes_lvis_paths(lvis_root, "val")[0]
    results = _fake_results(_load(json_file))
    ours = evaluate_lvis_predictions(COCO(json_file), results, iou_type)

    reference = copy.deepcopy(results)
    if iou_type == "segm":  # as detectron2 calls LVISEval: mask AP sizes instances by mask area
        for r in reference:
            r.pop("bbox")
    gt = LVIS(json_file)
    lvis_eval = LVISEval(gt, LVISResults(gt, reference, max_dets=300), iou_type)
    lvis_eval.run()
    expected = lvis_eval.get_results()
    assert set(ours) == set(LVIS_METRICS)
    assert 0 < expected["AP"] < 1 and expected["APr"] > -1 and expected["APc"] > -1 and expected["APf"] > -1
    for name in LVIS_METRICS:
        assert ours[name] / 100 == pytest.approx(float(expected[name]), abs=1e-6), name


def test_evaluator_prints_the_table_and_writes_results(lvis_root, tmp_path, caplog):
    """LVISEvaluator on model-style outputs: contiguous class ids, both tasks, table and results file."""
    name = "test_lvis_evaluator_val"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_lvis_format(name, *shapes_lvis_paths(lvis_root, "val"))
    records = DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).thing_classes == ["circle", "square", "triangle", "star"]
    evaluator = LVISEvaluator(name, ("bbox", "segm"), False, str(tmp_path))
    evaluator.reset()
    for record in records:
        h, w = record["height"], record["width"]
        inst = Instances((h, w))
        anns = record["annotations"]
        masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w))) for a in anns]
        inst.pred_boxes = Boxes(torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                               a["bbox"][1] + a["bbox"][3]] for a in anns]).reshape(-1, 4))
        inst.scores = torch.linspace(0.9, 0.5, len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        inst.pred_masks = torch.from_numpy(np.stack(masks)).bool() if masks else torch.zeros((0, h, w), dtype=torch.bool)
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    logger = logging.getLogger("diffusioninst.evaluation")  # detectron2's setup_logger may stop propagation
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="diffusioninst.evaluation"):
            results = evaluator.evaluate()
    finally:
        logger.removeHandler(caplog.handler)
    assert set(results) == {"bbox", "segm"} and set(results["segm"]) == set(LVIS_METRICS)
    assert results["segm"]["AP"] == pytest.approx(100.0)  # the ground truth itself
    assert results["bbox"]["AP"] > 90
    assert "APr" in caplog.text and "catIds=  r" in caplog.text
    saved = _load(tmp_path / "lvis_instances_results.json")
    assert {r["category_id"] for r in saved} <= {1, 2, 3, 4} and len(saved) == sum(len(r["annotations"]) for r in records)


def _run(cmd, env, timeout=300):
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


def _lvis_v1_layout(lvis_root: str, root: str) -> None:
    """detectron2's LVIS v1 layout under ``root`` with only a val json: lvis/lvis_v1_val.json (the shapes val split,
    its 4 classes padded to LVIS's 1,203) and the images under coco/val2017."""
    data = _load(shapes_lvis_paths(lvis_root, "val")[0])
    data["categories"] += [{"id": i, "name": f"unused_{i}", "synonyms": [f"unused_{i}"], "synset": f"unused.n.{i}",
                            "def": "", "frequency": "r", "image_count": 0, "instance_count": 0}
                           for i in range(5, 1204)]
    for img in data["images"]:  # the padded classes are verified absent, so a random model's detections count
        img["coco_url"] = img["coco_url"].replace("/val/", "/val2017/")
        img["neg_category_ids"] += list(range(5, 1204))
    os.makedirs(os.path.join(root, "lvis"))
    with open(os.path.join(root, "lvis", "lvis_v1_val.json"), "w") as f:
        json.dump(data, f)
    shutil.copytree(os.path.join(lvis_root, "shapes", "val"), os.path.join(root, "coco", "val2017"))


@pytest.mark.slow
def test_eval_only_needs_only_the_val_json_and_training_names_the_missing_one(lvis_root, tmp_path):
    """--eval-only on detectron2's lvis_v1_val with no lvis_v1_train.json prints LVIS's bbox and segm tables and
    writes results.json; training in the same layout stops with one line naming the missing training file."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from diffusioninst import add_diffusioninst_config

    root = str(tmp_path / "datasets")
    _lvis_v1_layout(lvis_root, root)
    opts = [str(o) for o in TINY_OPTS] + [
        "DATASETS.TRAIN", "('lvis_v1_train',)", "DATASETS.TEST", "('lvis_v1_val',)",
        "MODEL.DiffusionInst.NUM_CLASSES", "1203", "MODEL.DiffusionInst.FED_LOSS_NUM_CLASSES", "50",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
    ]
    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    cfg.merge_from_file(LVIS_CONFIG)
    cfg.merge_from_list(opts)
    weights = str(tmp_path / "model.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)

    env = {"DETECTRON2_DATASETS": root, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "eval"
    proc = _run([sys.executable, TRAIN_NET, "--config-file", LVIS_CONFIG, "--eval-only", *opts,
                 "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out)], env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert not os.path.exists(os.path.join(root, "lvis", "lvis_v1_train.json"))
    for task in ("bbox", "segm"):
        assert f"Evaluation results for {task}" in log
    assert "APr" in log and "APc" in log and "APf" in log
    saved = _load(out / "inference" / "lvis_v1_val" / "results.json")
    assert {"bbox", "segm"} <= set(saved["results"]) and set(LVIS_METRICS) <= set(saved["results"]["segm"])

    proc = _run([sys.executable, TRAIN_NET, "--config-file", LVIS_CONFIG, *opts, "OUTPUT_DIR", str(tmp_path / "t")], env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "lvis_v1_train" in last and os.path.join(root, "lvis", "lvis_v1_train.json") in last, proc.stderr[-3000:]


@pytest.mark.slow
def test_training_with_federated_loss_and_repeat_factors_then_lvis_evaluation(lvis_root, tmp_path):
    """The LVIS code path end to end on CPU: federated loss, RepeatFactorTrainingSampler, LVIS evaluation, and the
    test-time-augmentation evaluator on the same data."""
    out = tmp_path / "run"
    opts = [str(o) for o in TINY_OPTS] + ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1",
                                          "OUTPUT_DIR", str(out)]
    env = {"DETECTRON2_DATASETS": lvis_root, "OMP_NUM_THREADS": "1"}
    proc = _run([sys.executable, TRAIN_NET, "--config-file", LVIS_CONFIG, *opts], env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "RepeatFactorTrainingSampler" in log
    assert "Evaluation results for segm" in log and "APr" in log
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert all(np.isfinite(m["loss_ce"]) for m in metrics if "loss_ce" in m)
    saved = _load(out / "inference" / "shapes_lvis_val" / "results.json")
    assert set(LVIS_METRICS) <= set(saved["results"]["bbox"])

    proc = _run([sys.executable, TRAIN_NET, "--config-file", LVIS_CONFIG, "--eval-only", *opts,
                 "MODEL.WEIGHTS", str(out / "model_final.pth"), "TEST.AUG.ENABLED", "True",
                 "TEST.AUG.MIN_SIZES", "(96, 128)", "TEST.AUG.SCALE_RANGES", "([0, 10000], [0, 10000])"], env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    saved = _load(out / "inference_TTA" / "shapes_lvis_val" / "results.json")
    assert set(LVIS_METRICS) <= set(saved["results"]["segm"])
