"""Decoder head: equals the original's tensor layouts, shapes, initialisation, mask branch."""
from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model

from benchmarks import original_release as ref
from conftest import tiny_cfg
from diffusioninst.modeling.mask_branch import MaskRefine, aligned_bilinear


def _features(model, h=96, w=128, batch=2, seed=0):
    torch.manual_seed(seed)
    images = torch.randn(batch, 3, h, w)
    feats = model.backbone(images)
    return [feats[f] for f in model.in_features], [feats[f] for f in model.mask_in_features]


def _random_boxes(batch, n, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, n, 2, generator=g) * torch.tensor([w, h]) * 0.7
    wh = torch.rand(batch, n, 2, generator=g) * torch.tensor([w, h]) * 0.3 + 2
    return torch.cat([xy, xy + wh], dim=-1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg("MODEL.DiffusionInst.NUM_CLASSES", 3)).eval()


def test_head_equals_original_layout(model):
    """Our batched decoder gives the original's logits, boxes, filters and F_mask (different tensor layouts)."""
    with torch.no_grad():
        feats, mask_in = _features(model)
        boxes = _random_boxes(2, 20, 96, 128)
        t = torch.tensor([3, 870])
        logits, pred_boxes, filters = model.head(feats, boxes, t)
        mask_feats = model.head.mask_features(mask_in)
        r_logits, r_boxes, r_filters, r_mask = ref.head_forward(model.head, feats, boxes, t)
    assert logits.shape == (2, 2, 20, 3) and pred_boxes.shape == (2, 2, 20, 4) and filters.shape == (2, 2, 20, 153)
    torch.testing.assert_close(logits, r_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred_boxes, r_boxes, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(filters, r_filters, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mask_feats, r_mask, rtol=1e-5, atol=1e-5)
    assert mask_feats.shape == (2, 8, 24, 32)


def test_stages_see_detached_boxes_but_losses_reach_every_stage(model):
    model.train()
    try:
        feats, _ = _features(model, batch=1)
        logits, boxes, filters = model.head(feats, _random_boxes(1, 20, 96, 128), torch.tensor([10]))
        boxes[0].sum().backward()
        first = model.head.head_series[0].bboxes_delta.weight.grad
        second = model.head.head_series[1].bboxes_delta.weight.grad
        assert first is not None and first.abs().sum() > 0
        assert second is None or second.abs().sum() == 0
    finally:
        model.zero_grad()
        model.eval()


@pytest.mark.parametrize("num_classes", [3, 4, 80])
def test_focal_prior_only_on_classification_bias(num_classes):
    """With 3 or 4 classes no weight other than the class bias is set to the prior constant."""
    torch.manual_seed(0)
    m = build_model(tiny_cfg("MODEL.DiffusionInst.NUM_CLASSES", num_classes))
    prior = -torch.log(torch.tensor((1 - 0.01) / 0.01))
    for name, p in m.head.named_parameters():
        is_constant_prior = p.numel() > 1 and torch.allclose(p, prior.expand_as(p))
        if name.endswith("class_logits.bias"):
            assert is_constant_prior, name
        else:
            assert not is_constant_prior, f"{name} was set to the focal prior"
    deltas = m.head.head_series[0].bboxes_delta
    assert deltas.weight.std() > 0 and m.head.head_series[0].controller.weight.std() > 0


def test_xavier_init_for_matrices():
    torch.manual_seed(0)
    m = build_model(tiny_cfg())
    w = m.head.head_series[0].linear1.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_aligned_bilinear_keeps_constants_and_grid():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    up = aligned_bilinear(x, 4)
    assert up.shape == (1, 1, 12, 16)
    # Input sample (i, j) lands on output pixel (4i + 2, 4j + 2): the centre of its 4x4 cell.
    torch.testing.assert_close(up[0, 0, 2::4, 2::4], x[0, 0])
    torch.testing.assert_close(aligned_bilinear(torch.full((1, 2, 5, 5), 3.0), 2), torch.full((1, 2, 10, 10), 3.0))
    with pytest.raises(ValueError):
        aligned_bilinear(x, 1.5)


def test_mask_refine_rejects_mismatched_levels():
    refine = MaskRefine(3, 8, 4)
    with pytest.raises(ValueError, match="3 levels"):
        refine([torch.zeros(1, 8, 8, 8)])
    with pytest.raises(ValueError, match="does not divide"):
        refine([torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 3, 3), torch.zeros(1, 8, 2, 2)])
