"""ONNX export of a trained DiffusionInst (``ExportableDiffusionInst`` through PyTorch's exporter), the check of
onnxruntime's outputs against PyTorch's, and :class:`OnnxPredictor`, which runs the file like detectron2's
DefaultPredictor. The ONNX file's metadata records what a caller needs: the test-time resize rule, the channel order,
the number of proposals and sampling steps, and the class names."""
from __future__ import annotations

import json
import warnings
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..predictor import initial_noise
from .model import ExportableDiffusionInst

__all__ = ["OnnxPredictor", "check_onnx", "export_onnx", "mask_ious"]

OPSET = 17
INPUTS = ("image", "init_boxes", "step_noise")
OUTPUTS = ("boxes", "scores", "classes", "masks")


def export_onnx(model: torch.nn.Module, cfg, path: str, sample_image: torch.Tensor, class_names: Sequence[str] = (),
                class_colors: Sequence[Sequence[int]] = ()) -> Dict[str, Any]:
    """Write ``model`` (a DiffusionInst) to ``path`` as ONNX (dynamic image height and width), traced on
    ``sample_image`` (1, 3, H, W) float 0-255; returns the metadata stored in the file."""
    import onnx

    exportable = ExportableDiffusionInst(model).eval()
    init, later = initial_noise(exportable.model.num_proposals, exportable.steps)
    args = (sample_image, torch.from_numpy(init)) + (() if later is None else (torch.from_numpy(later),))
    names = list(INPUTS[: len(args)])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values in detectron2's code, checked below
        torch.onnx.export(exportable, args, path, dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=list(OUTPUTS), dynamic_axes={"image": {2: "height", 3: "width"},
                                                                    "boxes": {0: "detections"},
                                                                    "scores": {0: "detections"},
                                                                    "classes": {0: "detections"},
                                                                    "masks": {0: "detections", 1: "height", 2: "width"}})
    metadata = {
        "format": cfg.INPUT.FORMAT, "min_size_test": cfg.INPUT.MIN_SIZE_TEST, "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "num_proposals": exportable.model.num_proposals, "sample_steps": exportable.steps,
        "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE, "class_names": list(class_names),
        "class_colors": [list(c) for c in class_colors],
    }
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {"diffusioninst": json.dumps(metadata)})
    onnx.save(proto, path)
    return metadata


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of matching binary masks (K, H, W) x (K, H, W) -> (K,); two empty masks have IoU 1."""
    a, b = a.reshape(len(a), -1).astype(bool), b.reshape(len(b), -1).astype(bool)
    union = (a | b).sum(1)
    return np.where(union > 0, (a & b).sum(1) / np.maximum(union, 1), 1.0)


def check_onnx(path: str, model: torch.nn.Module, image: torch.Tensor, seed: int = 0) -> Dict[str, Any]:
    """onnxruntime against PyTorch's ``model.inference`` on ``image`` (1, 3, H, W) with the same sampling noise:
    the figures of the export check and whether each passes (same detections and classes, boxes within 0.01 px,
    scores within 1e-4, mask IoU >= 0.99 for every detection)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["diffusioninst"])
    init, later = initial_noise(meta["num_proposals"], meta["sample_steps"], seed)
    feeds = {"image": image.numpy().astype(np.float32), "init_boxes": init}
    if later is not None:
        feeds["step_noise"] = later
    boxes, scores, classes, masks = session.run(list(OUTPUTS), feeds)
    h, w = image.shape[-2:]
    with torch.no_grad():
        ref = model.inference([{"image": image[0], "height": h, "width": w}], init_boxes=torch.from_numpy(init),
                              step_noise=None if later is None else torch.from_numpy(later))[0]["instances"].to("cpu")
    report: Dict[str, Any] = {"detections": len(boxes), "detections_pytorch": len(ref)}
    report["passed"] = report["same_detections"] = len(boxes) == len(ref)
    if report["same_detections"]:
        report["same_classes"] = bool((classes == ref.pred_classes.numpy()).all())
        report["max_box_diff_px"] = float(np.abs(boxes - ref.pred_boxes.tensor.numpy()).max(initial=0.0))
        report["max_score_diff"] = float(np.abs(scores - ref.scores.numpy()).max(initial=0.0))
        report["min_mask_iou"] = float(mask_ious(masks, ref.pred_masks.numpy()).min(initial=1.0))
        report["passed"] = bool(report["same_classes"] and report["max_box_diff_px"] <= 0.01
                                and report["max_score_diff"] <= 1e-4 and report["min_mask_iou"] >= 0.99)
    return report


class OnnxPredictor:
    """Runs an exported DiffusionInst with onnxruntime, called like detectron2's DefaultPredictor: an (H, W, C)
    uint8 image (BGR by default, as OpenCV reads it) in, ``{"instances": Instances}`` at the image's size out.

    The image is resized by the file's test-time rule (shortest edge, maximum size) and converted to its channel
    order; the sampling noise comes from :func:`initial_noise` with ``seed``, so results are repeatable.
    """

    def __init__(self, path: str, input_format: str = "BGR", seed: int = 0, threads: int = 0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.metadata = json.loads(self.session.get_modelmeta().custom_metadata_map["diffusioninst"])
        self.input_format, self.seed = input_format, seed
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, original_image: np.ndarray) -> Dict[str, Any]:
        from detectron2.data import transforms as T
        from detectron2.structures import Boxes, Instances

        meta = self.metadata
        image = original_image[:, :, ::-1] if self.input_format != meta["format"] else original_image
        height, width = image.shape[:2]
        resize = T.ResizeShortestEdge([meta["min_size_test"]] * 2, meta["max_size_test"])
        resized = resize.get_transform(image).apply_image(image)
        init, later = initial_noise(meta["num_proposals"], meta["sample_steps"], self.seed)
        feeds = {"image": np.ascontiguousarray(resized.transpose(2, 0, 1)[None], dtype=np.float32),
                 "init_boxes": init}
        if "step_noise" in self.inputs:
            feeds["step_noise"] = later
        boxes, scores, classes, masks = self.session.run(list(OUTPUTS), feeds)
        in_h, in_w = resized.shape[:2]
        instances = Instances((height, width))
        boxes = boxes * np.array([width / in_w, height / in_h, width / in_w, height / in_h], dtype=np.float32)
        instances.pred_boxes = Boxes(torch.from_numpy(boxes))
        instances.scores = torch.from_numpy(scores)
        instances.pred_classes = torch.from_numpy(classes)
        instances.pred_masks = torch.from_numpy(_resize_masks(masks, (height, width)))
        return {"instances": instances}


def _resize_masks(masks: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Binary masks (K, h, w) resized to (K, H, W) bilinearly, kept where at least half on."""
    import cv2

    if masks.shape[1:] == tuple(size):
        return masks.astype(bool)
    out: List[np.ndarray] = [cv2.resize(m.astype(np.float32), size[::-1], interpolation=cv2.INTER_LINEAR) >= 0.5
                             for m in masks]
    return np.stack(out) if out else np.zeros((0, *size), dtype=bool)
