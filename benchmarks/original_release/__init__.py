"""A straightforward re-statement of the original release's inference and training code paths.

The equivalence tests (tests/test_model.py, tests/test_training_reference.py) check the project's model against it,
and the benchmark (benchmarks, tools/benchmark.py) times both on the same weights and inputs.
"""
from .inference import (
    cxcywh_to_xyxy, grouped_mask_head, head_forward, original_inference, postprocess, stage_forward, topk_repeated,
    torch_linear, xyxy_to_cxcywh,
)
from .training import (
    original_noisy_boxes, original_optimizer, original_targets, original_training_forward, original_training_losses,
    plain_box_pooler,
)

__all__ = [
    "cxcywh_to_xyxy", "grouped_mask_head", "head_forward", "original_inference", "original_noisy_boxes",
    "original_optimizer", "original_targets", "original_training_forward", "original_training_losses",
    "plain_box_pooler", "postprocess", "stage_forward", "topk_repeated", "torch_linear", "xyxy_to_cxcywh",
]
