"""The model's state_dict matches the original release's keys and shapes exactly (R50, 80 classes, 500 boxes)."""
from __future__ import annotations

import pytest
import torch

from detectron2.modeling import build_model

from conftest import load_cfg, reference_state_dict_shapes


@pytest.fixture(scope="module")
def r50_model():
    cfg = load_cfg("diffinst.coco.res50.5x.yaml", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "")
    return build_model(cfg)


def test_keys_and_shapes_equal_the_original(r50_model):
    ref = reference_state_dict_shapes()
    ours = {k: tuple(v.shape) for k, v in r50_model.state_dict().items()}
    assert len(ref) == 605
    missing = sorted(set(ref) - set(ours))
    unexpected = sorted(set(ours) - set(ref))
    assert not missing, f"missing keys: {missing[:10]}"
    assert not unexpected, f"unexpected keys: {unexpected[:10]}"
    wrong = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert not wrong, f"shape mismatches: {wrong}"
    assert list(ours) == list(ref), "key order differs from the original"


def test_original_checkpoint_loads_strictly(r50_model):
    """A state dict laid out like the original's loads with no missing or unexpected keys."""
    ref = reference_state_dict_shapes()
    fake = {k: torch.zeros(shape) for k, shape in ref.items()}
    result = r50_model.load_state_dict(fake, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert float(r50_model.head.head_series[0].class_logits.weight.detach().abs().sum()) == 0.0
