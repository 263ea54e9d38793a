"""Export to ONNX: the static-rank inference graph, the export with its check against PyTorch, and a predictor that runs
the file with onnxruntime (``pip install -e .[onnx]`` for onnx and onnxruntime)."""
from .model import ExportableDiffusionInst
from .onnx import OnnxPredictor, check_onnx, export_onnx, mask_ious, pair_detections

__all__ = ["ExportableDiffusionInst", "OnnxPredictor", "check_onnx", "export_onnx", "mask_ious", "pair_detections"]
