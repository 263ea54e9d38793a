"""Dice, federated-loss sampling and box-loss primitives (the focal loss is fvcore's)."""
from __future__ import annotations

import math

import torch

from diffusioninst.modeling.box_ops import generalized_box_iou
from diffusioninst.modeling.losses import (
    dice_loss,
    fed_loss_class_weights,
    federated_loss_classes,
    giou_loss,
    l1_box_loss,
)


def test_dice_known_values() -> None:
    masks = (torch.rand(3, 8, 8) > 0.5).float()
    masks[:, 0, 0] = 1
    assert torch.allclose(dice_loss(masks, masks), torch.zeros(3), atol=1e-5)
    a = torch.zeros(2, 4, 4)
    b = torch.zeros(2, 4, 4)
    a[:, :2] = 1
    b[:, 2:] = 1
    torch.testing.assert_close(dice_loss(a, b), torch.ones(2))
    x = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    expected = 1 - 2 * 0.5 / (0.5 + 1.0 + 1e-5)
    assert math.isclose(dice_loss(x, t).item(), expected, rel_tol=1e-6)
    assert dice_loss(a.reshape(2, -1), b.reshape(2, -1)).shape == (2,)
    assert torch.equal(dice_loss(a, b), dice_loss(a.reshape(2, -1), b.reshape(2, -1)))


def test_federated_classes() -> None:
    num_classes = 20
    weight = torch.rand(num_classes) + 0.1
    gt = torch.tensor([3, 3, 7, 20, 20, 1, 20])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        classes = federated_loss_classes(gt, 10, num_classes, weight, generator=g)
        assert classes.dtype == torch.long and classes.numel() == 10
        assert len(set(classes.tolist())) == 10
        assert {1, 3, 7, 20} <= set(classes.tolist())
        assert classes.tolist().count(20) == 1
    fg_only = torch.tensor([0, 5, 5])
    for _ in range(20):
        classes = federated_loss_classes(fg_only, 8, num_classes, weight, generator=g)
        assert classes.numel() == 8 and num_classes not in classes.tolist()
        assert {0, 5} <= set(classes.tolist())
        assert classes.max() < num_classes
    many = torch.arange(15)
    assert torch.equal(federated_loss_classes(many, 10, num_classes, weight), many)


def test_federated_sampling_follows_weights() -> None:
    weight = torch.tensor([1.0, 1.0, 1000.0, 1.0, 1.0, 1000.0])
    g = torch.Generator().manual_seed(1)
    hits = sum(
        set(federated_loss_classes(torch.tensor([0]), 3, 6, weight, generator=g).tolist()) == {0, 2, 5}
        for _ in range(50)
    )
    assert hits >= 45


def test_fed_loss_class_weights() -> None:
    meta = [{"id": 3, "image_count": 16}, {"id": 1, "image_count": 4}, {"id": 2, "image_count": 9}]
    weights = fed_loss_class_weights(meta)
    assert weights.dtype == torch.float32
    assert weights.tolist() == [2.0, 3.0, 4.0]
    assert fed_loss_class_weights(meta, power=1.0).tolist() == [4.0, 9.0, 16.0]


def test_box_losses() -> None:
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(9, 2, generator=g)
    a = torch.cat((xy, xy + torch.rand(9, 2, generator=g) + 0.01), dim=1)
    xy = torch.rand(9, 2, generator=g)
    b = torch.cat((xy, xy + torch.rand(9, 2, generator=g) + 0.01), dim=1)
    torch.testing.assert_close(l1_box_loss(a, b), (a - b).abs().sum(1))
    torch.testing.assert_close(giou_loss(a, b), 1 - torch.diag(generalized_box_iou(a, b)))
    assert torch.allclose(giou_loss(a, a), torch.zeros(9), atol=1e-6)
    far = a + 10
    assert (giou_loss(a, far) > 1).all() and (giou_loss(a, far) <= 2).all()
    pred = a.clone().requires_grad_(True)
    (giou_loss(pred, b).sum() + l1_box_loss(pred, b).sum()).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_federated_loss_classes_with_fewer_classes_than_places() -> None:
    """With K classes and more places than candidates (a small LVIS-format dataset), every class is kept once."""
    weight = torch.tensor([1.0, 4.0, 9.0])
    kept = federated_loss_classes(torch.tensor([1, 1, 3]), 50, 3, weight)  # 3 = background
    assert sorted(kept.tolist()) == [0, 1, 2, 3]
    kept = federated_loss_classes(torch.tensor([3, 3]), 2, 3, weight, torch.Generator().manual_seed(0))
    assert len(kept) == 2 and len(set(kept.tolist())) == 2
