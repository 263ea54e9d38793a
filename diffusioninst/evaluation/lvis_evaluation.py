"""LVIS evaluation with faster-coco-eval's LVIS mode, behind detectron2's ``LVISEvaluator`` interface.

detectron2's LVISEvaluator computes its metrics with the ``lvis`` package (0.5.3, unmaintained), whose LVISEval uses
``np.float`` and fails on numpy >= 1.24 after the whole inference has run. faster-coco-eval implements the same
federated protocol (detections of classes neither annotated nor verified absent in an image are ignored, unmatched
detections of not-exhaustively annotated classes are not false positives, up to 300 detections per image, AP over
the rare / common / frequent groups); tests/test_lvis.py checks that it gives LVISEval's numbers.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import LVISEvaluator as _D2LVISEvaluator
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table
from faster_coco_eval import COCO, COCOeval_faster

__all__ = ["LVIS_METRICS", "LVISEvaluator", "evaluate_lvis_predictions"]

logger = logging.getLogger(__name__)

# detectron2's LVIS metric names -> faster-coco-eval's names in ``stats_as_dict``.
LVIS_METRICS = {
    "AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small", "APm": "AP_medium", "APl": "AP_large",
    "APr": "APr", "APc": "APc", "APf": "APf",
}


def _top_per_image(results: Sequence[dict], max_dets: int) -> List[dict]:
    """The ``max_dets`` highest-scoring results of each image (LVIS caps detections per image, not per class)."""
    by_image: Dict[int, List[dict]] = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    kept = []
    for dets in by_image.values():
        kept += sorted(dets, key=lambda r: r["score"], reverse=True)[:max_dets] if max_dets >= 0 else dets
    return kept


def evaluate_lvis_predictions(
    lvis_gt: COCO, results: Sequence[dict], iou_type: str, max_dets_per_image: int = 300,
    class_names: Optional[Sequence[str]] = None,
) -> Dict[str, float]:
    """LVIS AP, AP50, AP75, APs/m/l and APr/c/f (in percent) of COCO-style ``results`` (1-based LVIS category ids)
    against ``lvis_gt``; NaN for every metric when there are no results. ``class_names`` is accepted for
    detectron2's signature (per-class AP is not part of LVIS's table)."""
    if not results:
        logger.warning("No predictions from the model!")
        return {metric: float("nan") for metric in LVIS_METRICS}
    results = copy.deepcopy(list(results))
    if iou_type == "segm":  # mask AP ranks instances by mask area, so the box (and its area) must not be used
        for r in results:
            r.pop("bbox", None)
    logger.info("Evaluating with max detections per image = %d", max_dets_per_image)
    results = _top_per_image(results, max_dets_per_image)
    # LVIS ignores a detection whose class is neither annotated nor verified absent in its image. Dropping those
    # here gives the same numbers and avoids faster-coco-eval 1.8.0 failing (unordered_map::at) on an image that
    # keeps no detection and has no ground truth.
    known = defaultdict(set)
    for ann in lvis_gt.dataset["annotations"]:
        known[ann["image_id"]].add(ann["category_id"])
    for img in lvis_gt.dataset["images"]:
        known[img["id"]].update(img.get("neg_category_ids", ()))
    results = [r for r in results if r["category_id"] in known[r["image_id"]]]
    if not results:
        logger.warning("No prediction of a class annotated or verified absent in its image: every AP is 0")
        metrics = {metric: 0.0 for metric in LVIS_METRICS}
        logger.info("Evaluation results for %s: \n%s", iou_type, create_small_table(metrics))
        return metrics
    detections = lvis_gt.loadRes(results)
    lvis_eval = COCOeval_faster(lvis_gt, detections, iou_type, lvis_style=True, print_function=logger.info)
    lvis_eval.params.maxDets = [max_dets_per_image]
    lvis_eval.evaluate()
    lvis_eval.accumulate()
    lvis_eval.summarize()
    stats = lvis_eval.stats_as_dict
    metrics = {name: float(stats[key] * 100) for name, key in LVIS_METRICS.items()}
    logger.info("Evaluation results for %s: \n%s", iou_type, create_small_table(metrics))
    return metrics


class LVISEvaluator(_D2LVISEvaluator):
    """detectron2's LVISEvaluator (same arguments, printed tables, result names and ``lvis_instances_results.json``)
    with the metrics computed by :func:`evaluate_lvis_predictions`; it does not need the ``lvis`` package."""

    def __init__(self, dataset_name: str, tasks: Optional[Sequence[str]] = None, distributed: bool = True,
                 output_dir: Optional[str] = None, *, max_dets_per_image: Optional[int] = None):
        self._logger = logging.getLogger(__name__)
        self._tasks = tasks
        self._distributed = distributed
        self._output_dir = output_dir
        self._max_dets_per_image = 300 if max_dets_per_image is None else max_dets_per_image
        self._cpu_device = torch.device("cpu")
        self._metadata = MetadataCatalog.get(dataset_name)
        json_file = PathManager.get_local_path(self._metadata.json_file)
        self._lvis_api = COCO(json_file, print_function=self._logger.debug)
        # Test-set files hold no annotations (LVIS test is scored by its server): predictions are only saved.
        self._do_evaluation = len(self._lvis_api.getAnnIds()) > 0

    def _eval_predictions(self, predictions: List[dict]) -> None:
        """Fill ``self._results`` with the LVIS metrics of each task (bbox, segm)."""
        results = list(itertools.chain(*[p["instances"] for p in predictions]))
        tasks = self._tasks or self._tasks_from_predictions(results)
        mapping = self._metadata.get("thing_dataset_id_to_contiguous_id")
        to_dataset_id = {v: k for k, v in mapping.items()} if mapping else None
        for r in results:  # contiguous ids -> the file's ids (LVIS's are 1-based)
            r["category_id"] = to_dataset_id[r["category_id"]] if to_dataset_id else r["category_id"] + 1
        if self._output_dir:
            path = os.path.join(self._output_dir, "lvis_instances_results.json")
            self._logger.info("Saving results to %s", path)
            with PathManager.open(path, "w") as f:
                f.write(json.dumps(results))
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        for task in sorted(tasks):
            self._results[task] = evaluate_lvis_predictions(
                self._lvis_api, results, task, self._max_dets_per_image, self._metadata.get("thing_classes"))
