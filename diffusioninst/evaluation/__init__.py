"""Evaluation: the evaluator of each dataset, and LVIS metrics through faster-coco-eval behind detectron2's
LVISEvaluator interface."""
import os
from typing import Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

from .lvis_evaluation import LVIS_METRICS, LVISEvaluator, evaluate_lvis_predictions

__all__ = ["LVIS_METRICS", "LVISEvaluator", "build_evaluator", "evaluate_lvis_predictions"]


def build_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """Box and mask AP of ``dataset_name``: LVIS's federated metrics for LVIS-format datasets, else COCO's; results
    go to ``output_folder`` (default ``OUTPUT_DIR/inference/<dataset>``)."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    if MetadataCatalog.get(dataset_name).get("evaluator_type") == "lvis":
        return LVISEvaluator(dataset_name, ("bbox", "segm"), True, output_folder)
    return COCOEvaluator(dataset_name, ("bbox", "segm"), True, output_folder)
