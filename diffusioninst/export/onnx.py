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

__all__ = ["OnnxPredictor", "check_onnx", "export_onnx", "mask_ious", "pair_detections"]

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
    a, b = (m.reshape(len(m), int(np.prod(m.shape[1:]))).astype(bool) for m in (a, b))
    union = (a | b).sum(1)
    return np.where(union > 0, (a & b).sum(1) / np.maximum(union, 1), 1.0)


BOX_TOL, SCORE_TOL, MASK_IOU_MIN = 0.01, 1e-4, 0.99  # what the export check accepts (pixels, score, IoU)


def pair_detections(boxes_a: np.ndarray, classes_a: np.ndarray, boxes_b: np.ndarray, classes_b: np.ndarray,
                    max_distance: float = 1.0) -> Tuple[List[Tuple[int, int]], List[int], List[int]]:
    """Pair detections (K, 4) / (K,) of two runs by class and box, nearest boxes first (largest coordinate
    difference, at most ``max_distance`` pixels), each detection in one pair at most: ``(pairs (i, j), unpaired of a,
    unpaired of b)``. Independent of order: two runtimes may order equal scores differently."""
    if not len(boxes_a) or not len(boxes_b):
        return [], list(range(len(boxes_a))), list(range(len(boxes_b)))
    distance = np.abs(boxes_a[:, None, :].astype(np.float64) - boxes_b[None, :, :]).max(-1)
    distance[classes_a[:, None] != classes_b[None, :]] = np.inf
    pairs, used_a, used_b = [], set(), set()
    for flat in np.argsort(distance, axis=None, kind="stable").tolist():
        i, j = divmod(flat, len(boxes_b))
        if distance[i, j] > max_distance:
            break
        if i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    return (pairs, [i for i in range(len(boxes_a)) if i not in used_a],
            [j for j in range(len(boxes_b)) if j not in used_b])


def _candidates(steps: Sequence[Any], height: int, width: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (proposal, class) candidate of PyTorch's sampling steps (one image, output size = input size): boxes
    (M, 4) clipped to the image as the detections' are, classes (M,), scores (M,)."""
    boxes, classes, scores = [], [], []
    for step in steps:
        probs = step.logits[0].float().sigmoid()  # (N, K)
        box = step.boxes[0].float().clone()
        box[:, 0::2] = box[:, 0::2].clamp(0, width)
        box[:, 1::2] = box[:, 1::2].clamp(0, height)
        boxes.append(box.repeat_interleave(probs.shape[1], 0))
        classes.append(torch.arange(probs.shape[1]).repeat(probs.shape[0]))
        scores.append(probs.flatten())
    return tuple(torch.cat(x).numpy() for x in (boxes, classes, scores))


def _tie(box: np.ndarray, label: int, score: float, candidates: Any, own: bool) -> bool:
    """Whether a detection left unpaired is explained by a tie: its score equals (within SCORE_TOL) that of another
    of PyTorch's candidates, so the order of equals decided whether the top-k cut and NMS kept it. An onnxruntime
    detection (``own`` False) must also be one of PyTorch's candidates (same class, box within BOX_TOL).
    ``candidates``: :func:`_candidates`'s (boxes, classes, scores)."""
    boxes, classes, scores = candidates
    close = np.abs(scores - score) <= SCORE_TOL
    if own:
        return int(close.sum()) > 1
    same = close & (classes == label) & (np.abs(boxes - box).max(1) <= BOX_TOL)
    return bool(same.any()) and int(close.sum()) > 1


def check_onnx(path: str, model: torch.nn.Module, image: torch.Tensor, seed: int = 0) -> Dict[str, Any]:
    """onnxruntime against PyTorch's ``model.inference`` on ``image`` (1, 3, H, W) with the same sampling noise:
    the figures of the export check and whether each passes.

    Detections are paired by class and box, not by rank: equal scores (a confident model's sigmoid saturates at 1.0)
    may be ordered differently by the two runtimes, and then the top-k cut and NMS may keep different ones of them.
    It passes when every pair agrees (boxes within 0.01 px, scores within 1e-4, mask IoU >= 0.99) and every unpaired
    detection is such a tie: one of PyTorch's (proposal, class) candidates, with a score that another candidate
    shares (:func:`_tie`)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["diffusioninst"])
    init, later = initial_noise(meta["num_proposals"], meta["sample_steps"], seed)
    feeds = {"image": image.numpy().astype(np.float32), "init_boxes": init}
    if later is not None:
        feeds["step_noise"] = later
    boxes, scores, classes, masks = session.run(list(OUTPUTS), feeds)
    h, w = image.shape[-2:]
    steps: List[Any] = []
    with torch.no_grad(), model.sampler.observe(steps.append):
        ref = model.inference([{"image": image[0], "height": h, "width": w}], init_boxes=torch.from_numpy(init),
                              step_noise=None if later is None else torch.from_numpy(later))[0]["instances"].to("cpu")
    ref_boxes, ref_scores, ref_classes = ref.pred_boxes.tensor.numpy(), ref.scores.numpy(), ref.pred_classes.numpy()
    pairs, only_onnx, only_pytorch = pair_detections(boxes, classes, ref_boxes, ref_classes)
    candidates = _candidates(steps, h, w) if only_onnx or only_pytorch else None
    ties = [_tie(boxes[i], classes[i], float(scores[i]), candidates, own=False) for i in only_onnx] + [
        _tie(ref_boxes[j], ref_classes[j], float(ref_scores[j]), candidates, own=True) for j in only_pytorch]
    a, b = [i for i, _ in pairs], [j for _, j in pairs]
    report: Dict[str, Any] = {
        "detections": len(boxes), "detections_pytorch": len(ref), "paired": len(pairs),
        "unpaired_ties": sum(ties), "unpaired_not_tied": len(ties) - sum(ties),
        "max_box_diff_px": float(np.abs(boxes[a] - ref_boxes[b]).max(initial=0.0)),
        "max_score_diff": float(np.abs(scores[a] - ref_scores[b]).max(initial=0.0)),
        "min_mask_iou": float(mask_ious(masks[a], ref.pred_masks.numpy()[b]).min(initial=1.0)),
    }
    report["passed"] = bool(report["unpaired_not_tied"] == 0 and report["max_box_diff_px"] <= BOX_TOL
                            and report["max_score_diff"] <= SCORE_TOL and report["min_mask_iou"] >= MASK_IOU_MIN)
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
