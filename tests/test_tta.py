"""Test-time augmentation: flips map back exactly, one plain view equals plain inference, views merge by NMS."""
from __future__ import annotations

import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import tiny_cfg
from diffusioninst.modeling.test_time_augmentation import DiffusionInstWithTTA, _hflip


def _model():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("TEST.DETECTIONS_PER_IMAGE", 30, "MODEL.DiffusionInst.INFERENCE_SEED", 3)).eval()
    with torch.no_grad():  # a confident classifier, so that outputs are not all tied
        for stage in model.head.head_series:
            stage.class_logits.bias.uniform_(-1.0, 2.0)
    return model


def _input(height=80, width=112, image_id=7):
    g = torch.Generator().manual_seed(image_id)
    image = torch.randint(0, 255, (3, height, width), generator=g, dtype=torch.uint8)
    return {"image": image, "height": height, "width": width, "image_id": image_id}


def test_hflip_maps_boxes_and_masks_back():
    inst = Instances((4, 10))
    inst.pred_boxes = Boxes(torch.tensor([[1.0, 0.0, 4.0, 2.0]]))
    inst.scores = torch.tensor([0.9])
    inst.pred_classes = torch.tensor([2])
    mask = torch.zeros(1, 4, 10, dtype=torch.bool)
    mask[0, 0:2, 1:4] = True
    inst.pred_masks = mask
    flipped = _hflip(inst)
    assert flipped.pred_boxes.tensor.tolist() == [[6.0, 0.0, 9.0, 2.0]]
    assert flipped.pred_masks[0, 0:2, 6:9].all() and flipped.pred_masks.sum() == 6
    back = _hflip(flipped)
    assert torch.equal(back.pred_boxes.tensor, inst.pred_boxes.tensor) and torch.equal(back.pred_masks, mask)


def test_single_plain_view_equals_plain_inference():
    model = _model()
    x = _input()
    tta = DiffusionInstWithTTA(model, min_sizes=[80], max_size=1000, flip=False, nms_thresh=0.5, max_detections=30)
    plain = model.inference([x])[0]["instances"]
    merged = tta([x])[0]["instances"]
    assert len(plain) > 0 and len(merged) == len(plain)
    order = plain.scores.argsort(descending=True)
    assert torch.equal(merged.scores, plain.scores[order])
    assert torch.equal(merged.pred_boxes.tensor, plain.pred_boxes.tensor[order])
    assert torch.equal(merged.pred_masks, plain.pred_masks[order])


def test_multi_scale_flip_views_are_merged_at_original_size():
    model = _model()
    x = _input()
    tta = DiffusionInstWithTTA(
        model, min_sizes=[64, 96], max_size=1000, flip=True, scale_ranges=[(0, 10000), (0, 10000)], max_detections=25
    )
    out = tta([x])[0]["instances"]
    assert out.image_size == (80, 112)
    assert 0 < len(out) <= 25
    assert out.pred_masks.shape[1:] == (80, 112)
    assert (out.scores[:-1] >= out.scores[1:]).all()
    # A box-size range that excludes everything leaves nothing.
    empty = DiffusionInstWithTTA(model, min_sizes=[64], max_size=1000, flip=False, scale_ranges=[(5000, 10000)])
    assert len(empty([x])[0]["instances"]) == 0
