"""A predictor whose sampling noise comes from numpy's generator, so that the PyTorch model and its ONNX export
(``diffusioninst.export.OnnxPredictor``) give the same detections for the same image and seed."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from detectron2.engine import DefaultPredictor

__all__ = ["DiffusionInstPredictor", "initial_noise"]


def initial_noise(num_proposals: int, sample_steps: int, seed: int = 0) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The sampling noise of one image from numpy's generator: init_boxes (1, N, 4), and for more than one step the
    DDIM and renewal noise (steps - 1, 2, 1, N, 4) (``model.inference``'s ``init_boxes`` and ``step_noise``)."""
    rng = np.random.default_rng(seed)
    init = rng.standard_normal((1, num_proposals, 4), dtype=np.float32)
    later = rng.standard_normal((sample_steps - 1, 2, 1, num_proposals, 4), dtype=np.float32) if sample_steps > 1 else None
    return init, later


class DiffusionInstPredictor(DefaultPredictor):
    """detectron2's DefaultPredictor (image (H, W, C) uint8 in BGR, ``{"instances"}`` out), with the sampling noise
    of :func:`initial_noise` (``seed``): the same detections as the ONNX export run by ``OnnxPredictor``."""

    def __init__(self, cfg, seed: int = 0):
        super().__init__(cfg)
        self.seed = seed

    def __call__(self, original_image: np.ndarray) -> Dict[str, Any]:
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            image = self.aug.get_transform(original_image).apply_image(original_image)
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            model = self.model
            init, later = initial_noise(model.num_proposals, len(model.sampler.time_pairs), self.seed)
            return model.inference([{"image": image, "height": height, "width": width}],
                                   init_boxes=torch.from_numpy(init),
                                   step_noise=None if later is None else torch.from_numpy(later))[0]
