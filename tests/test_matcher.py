"""DynamicKMatcher against a per-image, per-gt loop transcription of DiffusionDet's HungarianMatcherDynamicK."""
from __future__ import annotations

import pytest
import torch
import torchvision.ops as ops

from diffusioninst.modeling.matcher import DynamicKMatcher, dynamic_k_match


def _cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def _xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def _reference_in_boxes(boxes: torch.Tensor, target_gts: torch.Tensor, radius: float):
    xy = _cxcywh_to_xyxy(target_gts)
    ax = boxes[:, 0].unsqueeze(1)
    ay = boxes[:, 1].unsqueeze(1)
    in_box = (
        (ax > xy[:, 0].unsqueeze(0)).long()
        + (ax < xy[:, 2].unsqueeze(0)).long()
        + (ay > xy[:, 1].unsqueeze(0)).long()
        + (ay < xy[:, 3].unsqueeze(0)).long()
    ) == 4
    gw = xy[:, 2] - xy[:, 0]
    gh = xy[:, 3] - xy[:, 1]
    in_ctr = (
        (ax > (target_gts[:, 0] - radius * gw).unsqueeze(0)).long()
        + (ax < (target_gts[:, 0] + radius * gw).unsqueeze(0)).long()
        + (ay > (target_gts[:, 1] - radius * gh).unsqueeze(0)).long()
        + (ay < (target_gts[:, 1] + radius * gh).unsqueeze(0)).long()
    ) == 4
    return in_box.sum(1).gt(0) | in_ctr.sum(1).gt(0), in_box & in_ctr


def _reference_dynamic_k(cost: torch.Tensor, ious: torch.Tensor, num_gt: int, ota_k: int, stats: dict):
    matching = torch.zeros_like(cost)
    topk_ious, _ = torch.topk(ious, min(ota_k, ious.shape[0]), dim=0)
    ks = torch.clamp(topk_ious.sum(0).int(), min=1)
    for g in range(num_gt):
        _, pos = torch.topk(cost[:, g], k=int(ks[g]), largest=False)
        matching[:, g][pos] = 1.0
    anchor_matching_gt = matching.sum(1)
    if (anchor_matching_gt > 1).sum() > 0:
        _, argmin = torch.min(cost[anchor_matching_gt > 1], dim=1)
        matching[anchor_matching_gt > 1] *= 0
        matching[anchor_matching_gt > 1, argmin] = 1
    while (matching.sum(0) == 0).any():
        stats["loops"] += 1
        before = matching.clone()
        cost[matching.sum(1) > 0] += 100000.0
        for g in torch.nonzero(matching.sum(0) == 0, as_tuple=False).squeeze(1):
            matching[:, g][torch.argmin(cost[:, g])] = 1.0
        if (matching.sum(1) > 1).sum() > 0:
            stats["loop_conflicts"] += 1
            _, argmin = torch.min(cost[anchor_matching_gt > 1], dim=1)
            matching[anchor_matching_gt > 1] *= 0
            matching[anchor_matching_gt > 1, argmin] = 1
        if torch.equal(before, matching):
            break
    selected = matching.sum(1) > 0
    return selected, matching[selected].max(1)[1]


def reference_match(logits, boxes, targets, ota_k=5, use_focal=True, use_fed_loss=False, stats=None):
    stats = stats if stats is not None else {"loops": 0, "loop_conflicts": 0}
    prob = logits.sigmoid() if (use_focal or use_fed_loss) else logits.softmax(-1)
    out = []
    for b in range(logits.shape[0]):
        p, bx, tgt = prob[b], boxes[b], targets[b]
        labels = tgt["labels"]
        if len(labels) == 0:
            out.append((torch.zeros(p.shape[0], dtype=torch.bool), torch.zeros(0, dtype=torch.long)))
            continue
        gt = tgt["boxes_xyxy"]
        fg, inside = _reference_in_boxes(_xyxy_to_cxcywh(bx), _xyxy_to_cxcywh(gt), 2.5)
        ious = ops.box_iou(bx, gt)
        if use_focal:
            neg = 0.75 * p**2.0 * (-(1 - p + 1e-8).log())
            pos = 0.25 * (1 - p) ** 2.0 * (-(p + 1e-8).log())
            cost_class = pos[:, labels] - neg[:, labels]
        elif use_fed_loss:
            cost_class = (-(p + 1e-8).log())[:, labels] - (-(1 - p + 1e-8).log())[:, labels]
        else:
            cost_class = -p[:, labels]
        whwh = tgt["image_size_xyxy"]
        cost_bbox = torch.cdist(bx / whwh, gt / whwh.repeat(len(gt), 1), p=1)
        cost_giou = -ops.generalized_box_iou(bx, gt)
        cost = 5.0 * cost_bbox + 2.0 * cost_class + 2.0 * cost_giou + 100.0 * (~inside)
        cost[~fg] = cost[~fg] + 10000.0
        out.append(_reference_dynamic_k(cost, ious, len(labels), ota_k, stats))
    return out


def _random_boxes(n: int, w: float, h: float, g: torch.Generator, center=None, spread=1.0, size=0.3):
    if center is None:
        cx = torch.rand(n, generator=g, dtype=torch.float64) * w
        cy = torch.rand(n, generator=g, dtype=torch.float64) * h
    else:
        cx = center[0] + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * spread * w
        cy = center[1] + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * spread * h
    bw = (torch.rand(n, generator=g, dtype=torch.float64) * size + 0.01) * w
    bh = (torch.rand(n, generator=g, dtype=torch.float64) * size + 0.01) * h
    return torch.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), dim=-1)


def _random_batch(g: torch.Generator, batch: int, n: int, max_gt: int, crowded: bool, num_classes: int = 6):
    logits = torch.randn(batch, n, num_classes, generator=g, dtype=torch.float64) * 2
    boxes, targets = [], []
    for _ in range(batch):
        w = float(torch.randint(200, 900, (1,), generator=g))
        h = float(torch.randint(200, 900, (1,), generator=g))
        num_gt = int(torch.randint(0, max_gt + 1, (1,), generator=g))
        if crowded:
            center = (0.5 * w, 0.5 * h)
            gt = _random_boxes(num_gt, w, h, g, center=center, spread=0.1, size=0.1)
            near = n // 4
            pred = torch.cat(
                (
                    _random_boxes(near, w, h, g, center=center, spread=0.15, size=0.1),
                    _random_boxes(n - near, w, h, g),
                )
            )
        else:
            gt = _random_boxes(num_gt, w, h, g)
            pred = _random_boxes(n, w, h, g)
        boxes.append(pred)
        targets.append(
            {
                "labels": torch.randint(0, num_classes, (num_gt,), generator=g),
                "boxes_xyxy": gt,
                "image_size_xyxy": torch.tensor([w, h, w, h], dtype=torch.float64),
            }
        )
    return logits, torch.stack(boxes), targets


def _assert_same(ours, ref):
    assert len(ours) == len(ref)
    for (sel, idx), (rsel, ridx) in zip(ours, ref):
        assert sel.dtype == torch.bool and idx.dtype == torch.long
        assert torch.equal(sel, rsel)
        assert torch.equal(idx, ridx)


@pytest.mark.parametrize("crowded", [False, True])
def test_matches_reference_on_random_cases(crowded: bool) -> None:
    g = torch.Generator().manual_seed(1234 + int(crowded))
    matcher = DynamicKMatcher()
    stats = {"loops": 0, "loop_conflicts": 0}
    for _ in range(60):
        batch = int(torch.randint(1, 4, (1,), generator=g))
        n = int(torch.randint(10, 101, (1,), generator=g))
        max_gt = int(torch.randint(0, 21, (1,), generator=g))
        logits, boxes, targets = _random_batch(g, batch, n, max_gt, crowded)
        ours = matcher(logits, boxes, targets)
        ref = reference_match(logits, boxes, targets, stats=stats)
        _assert_same(ours, ref)
    if crowded:
        assert stats["loops"] > 0
        assert stats["loop_conflicts"] > 0


@pytest.mark.parametrize("use_focal,use_fed_loss", [(False, True), (False, False)])
def test_matches_reference_other_class_costs(use_focal: bool, use_fed_loss: bool) -> None:
    g = torch.Generator().manual_seed(7)
    matcher = DynamicKMatcher(use_focal=use_focal, use_fed_loss=use_fed_loss)
    for crowded in (False, True):
        for _ in range(10):
            logits, boxes, targets = _random_batch(g, 2, 40, 12, crowded)
            ours = matcher(logits, boxes, targets)
            ref = reference_match(logits, boxes, targets, use_focal=use_focal, use_fed_loss=use_fed_loss)
            _assert_same(ours, ref)


def test_matches_reference_in_float32() -> None:
    g = torch.Generator().manual_seed(99)
    matcher = DynamicKMatcher()
    for i in range(20):
        logits, boxes, targets = _random_batch(g, 2, 60, 15, crowded=bool(i % 2))
        targets = [{k: (v.float() if v.is_floating_point() else v) for k, v in t.items()} for t in targets]
        logits, boxes = logits.float(), boxes.float()
        _assert_same(matcher(logits, boxes, targets), reference_match(logits, boxes, targets))


def test_loop_resolves_conflicts_with_the_stale_mask() -> None:
    cost = torch.tensor([[0.0, 1.0, 2.0], [5.0, 3.0, 4.0], [9.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    ious = torch.zeros(4, 3)
    matching = dynamic_k_match(cost[None].clone(), ious[None], torch.ones(1, 3, dtype=torch.bool))[0]
    expected = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert torch.equal(matching, expected)
    stats = {"loops": 0, "loop_conflicts": 0}
    sel, idx = _reference_dynamic_k(cost.clone(), ious, 3, 5, stats)
    assert torch.equal(sel, matching.any(1)) and torch.equal(idx, torch.tensor([0, 1]))
    assert stats == {"loops": 1, "loop_conflicts": 1}


def test_few_queries_and_tiny_k() -> None:
    g = torch.Generator().manual_seed(3)
    matcher = DynamicKMatcher()
    for n in (1, 2, 3, 4):
        for _ in range(10):
            logits, boxes, targets = _random_batch(g, 2, n, 1, crowded=True)
            _assert_same(matcher(logits, boxes, targets), reference_match(logits, boxes, targets))


def test_empty_targets() -> None:
    matcher = DynamicKMatcher()
    logits = torch.randn(2, 7, 3)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(2, 7, 1)
    empty = {
        "labels": torch.zeros(0, dtype=torch.long),
        "boxes_xyxy": torch.zeros(0, 4),
        "image_size_xyxy": torch.tensor([100.0, 100.0, 100.0, 100.0]),
    }
    out = matcher(logits, boxes, [empty, dict(empty)])
    for sel, idx in out:
        assert sel.shape == (7,) and not sel.any()
        assert idx.shape == (0,) and idx.dtype == torch.long
    one = {
        "labels": torch.tensor([1]),
        "boxes_xyxy": torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
        "image_size_xyxy": torch.tensor([100.0, 100.0, 100.0, 100.0]),
    }
    (sel0, idx0), (sel1, idx1) = matcher(logits, boxes, [empty, one])
    assert not sel0.any() and idx0.numel() == 0
    assert sel1.sum() == 5 and torch.equal(idx1, torch.zeros(5, dtype=torch.long))


def test_hand_made_gt_takes_its_exact_queries() -> None:
    gt = torch.tensor([[20.0, 20.0, 60.0, 60.0]])
    far = torch.tensor([[150.0, 150.0, 190.0, 190.0]])
    half = torch.tensor([[20.0, 20.0, 60.0, 40.0]])
    boxes = torch.cat((far, gt, far, gt, half, far, far, gt, far, far))
    logits = torch.zeros(1, 10, 3)
    target = {
        "labels": torch.tensor([2]),
        "boxes_xyxy": gt,
        "image_size_xyxy": torch.tensor([200.0, 200.0, 200.0, 200.0]),
    }
    sel, idx = DynamicKMatcher()(logits, boxes[None], [target])[0]
    assert torch.equal(torch.nonzero(sel).squeeze(1), torch.tensor([1, 3, 7]))
    assert torch.equal(idx, torch.zeros(3, dtype=torch.long))

    boxes = torch.cat((far, gt, far, half, gt, far))
    sel, idx = DynamicKMatcher()(torch.zeros(1, 6, 3), boxes[None], [target])[0]
    assert torch.equal(torch.nonzero(sel).squeeze(1), torch.tensor([1, 4]))


def test_two_gts_split_their_queries() -> None:
    gts = torch.tensor([[10.0, 10.0, 50.0, 50.0], [120.0, 120.0, 180.0, 160.0]])
    boxes = torch.cat((gts[1:].repeat(2, 1), gts[:1].repeat(3, 1), torch.tensor([[80.0, 0.0, 100.0, 20.0]])))
    target = {
        "labels": torch.tensor([0, 1]),
        "boxes_xyxy": gts,
        "image_size_xyxy": torch.tensor([200.0, 200.0, 200.0, 200.0]),
    }
    sel, idx = DynamicKMatcher()(torch.zeros(1, 6, 2), boxes[None], [target])[0]
    assert torch.equal(sel, torch.tensor([True, True, True, True, True, False]))
    assert torch.equal(idx, torch.tensor([1, 1, 0, 0, 0]))
