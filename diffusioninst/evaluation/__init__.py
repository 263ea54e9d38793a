"""Evaluation: LVIS metrics through faster-coco-eval behind detectron2's LVISEvaluator interface."""
from .lvis_evaluation import LVIS_METRICS, LVISEvaluator, evaluate_lvis_predictions

__all__ = ["LVIS_METRICS", "LVISEvaluator", "evaluate_lvis_predictions"]
