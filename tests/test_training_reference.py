"""Training losses and gradients of our batched path equal the original release's per-image code path."""
from __future__ import annotations

import random
from typing import Dict, List

import pytest
import torch
from detectron2.layers import ROIAlign
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from benchmarks import original_release as ref
from conftest import tiny_cfg
from diffusioninst.modeling.diffusion import corrupt_boxes, pad_boxes
from diffusioninst.layers import ROIAlignCPU


def _instances(h: int, w: int, num: int, num_classes: int, g: torch.Generator) -> Instances:
    """num random boxes inside an (h, w) image, with random classes and elliptic masks inside the boxes."""
    xy0 = torch.rand(num, 2, generator=g) * 0.6
    wh = 0.15 + torch.rand(num, 2, generator=g) * 0.25
    boxes = torch.cat([xy0, (xy0 + wh).clamp(max=1.0)], dim=1) * torch.tensor([w, h, w, h], dtype=torch.float32)
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    masks = torch.zeros(num, h, w, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.tolist()):
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        m[((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1] = True
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(0, num_classes, (num,), generator=g)
    inst.gt_masks = BitMasks(masks)
    return inst


def _batch(num_classes: int, seed: int, sizes=((96, 128, 3), (112, 96, 0), (80, 144, 9))) -> List[Dict]:
    """Images of different sizes: (h, w, number of instances) each; 0 is an image without instances."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
         "instances": _instances(h, w, num, num_classes, g)}
        for h, w, num in sizes
    ]


def _model(*opts) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.DiffusionInst.NUM_CLASSES", 3, *opts))
    return model.train()


def _ours(model, batch, boxes, t) -> Dict[str, torch.Tensor]:
    """Our training path piece by piece, with given noisy boxes (B, N, 4) and steps t (B,)."""
    images, whwh = model.preprocess_image(batch)
    features, mask_feats = model.extract_features(images)
    targets = model.prepare_targets([x["instances"] for x in batch], whwh)
    logits, pred_boxes, filters = model.head(features, boxes, t)
    return model.criterion(logits, pred_boxes, filters, mask_feats, targets)


def _losses_and_grads(model, fn) -> tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    losses = fn()
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def _noisy_boxes(model, batch, seed: int, small_t: bool):
    """Padded gt noised at seeded random steps, or at small steps (boxes near the gts: many matches and conflicts)."""
    torch.manual_seed(seed)
    images, whwh = model.preprocess_image(batch)
    targets = model.prepare_targets([x["instances"] for x in batch], whwh)
    x_start = torch.stack([pad_boxes(tg["boxes"], model.num_proposals) for tg in targets])
    if small_t:
        t = torch.tensor([3, 40, 10])[: len(batch)]
    else:
        t = torch.randint(0, model.num_timesteps, (len(batch),))
    noise = torch.randn(x_start.shape)
    boxes = corrupt_boxes(x_start, t, noise, model.scale, model.sqrt_alphas_cumprod,
                          model.sqrt_one_minus_alphas_cumprod)
    return boxes.float() * whwh[:, None, :], t


CASES = [
    pytest.param((), 0, False, id="random-t"),
    pytest.param((), 1, True, id="near-gt"),
    pytest.param(("MODEL.DiffusionInst.MASK_DEEP_SUPERVISION", False), 2, True, id="last-stage-masks"),
    pytest.param(("MODEL.DiffusionInst.NUM_CLASSES", 4, "MODEL.DiffusionInst.NUM_HEADS", 3), 3, True, id="4-classes"),
]


@pytest.mark.parametrize("opts,seed,small_t", CASES)
def test_losses_and_gradients_equal_original(opts, seed, small_t):
    model = _model(*opts)
    batch = _batch(model.num_classes, seed)
    boxes, t = _noisy_boxes(model, batch, seed, small_t)
    ours, ours_grads = _losses_and_grads(model, lambda: _ours(model, batch, boxes, t))
    expected, ref_grads = _losses_and_grads(model, lambda: ref.original_training_losses(model, batch, boxes, t))

    stages = len(model.head.head_series)
    keys = {"loss_ce", "loss_bbox", "loss_giou", "loss_masks"}
    keys |= {f"{k}_{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in range(stages - 1)}
    if model.criterion.mask_deep_supervision:
        keys |= {f"loss_masks_{s}" for s in range(stages - 1)}
    assert set(ours) == set(expected) == keys
    assert all(float(v) > 0 for v in expected.values()), expected
    for k in keys:
        torch.testing.assert_close(ours[k], expected[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")

    assert set(ours_grads) == set(ref_grads)
    nonzero = [n for n, g in ref_grads.items() if g.abs().sum() > 0]
    assert len(nonzero) > 0.9 * len(list(model.parameters()))
    for name in ref_grads:
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(ours_grads[name], ref_grads[name], rtol=1e-3, atol=1e-4 * scale + 1e-7,
                                   msg=lambda m: f"grad of {name}: {m}")


def test_batch_without_instances_gives_zero_box_and_mask_losses():
    model = _model()
    batch = _batch(model.num_classes, 5, sizes=((96, 128, 0), (80, 96, 0)))
    boxes, t = _noisy_boxes(model, batch, 5, False)
    ours, _ = _losses_and_grads(model, lambda: _ours(model, batch, boxes, t))
    expected, ref_grads = _losses_and_grads(model, lambda: ref.original_training_losses(model, batch, boxes, t))
    assert set(ours) == set(expected)
    for k in expected:
        torch.testing.assert_close(ours[k], expected[k], rtol=1e-5, atol=1e-6)
        assert (float(expected[k]) > 0) == k.startswith("loss_ce"), k


def test_reference_uses_stock_roi_align_with_the_same_settings():
    """Our pooler has the sparse backward; the reference's is detectron2's own, with an equal forward."""
    model = _model()
    ours = model.head.box_pooler
    plain = ref.plain_box_pooler(ours)
    assert all(type(m) is ROIAlignCPU for m in ours.level_poolers)
    assert all(type(m) is ROIAlign for m in plain.level_poolers)
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 24 // 2**i, 32 // 2**i, requires_grad=True) for i in range(len(plain.level_poolers))]
    boxes = [Boxes(torch.tensor([[4.0, 4.0, 60.0, 50.0], [0.0, 10.0, 120.0, 90.0]])),
             Boxes(torch.tensor([[8.0, 2.0, 30.0, 20.0]]))]
    assert torch.equal(ours(feats, boxes), plain(feats, boxes))


def test_original_noisy_boxes_are_clamped_signals_at_random_steps():
    """Padded (2 gts), placeholder-only (none) and subsampled (9 gts > 6) images: (cx, cy, w, h) in [0, 1]."""
    model = _model("MODEL.DiffusionInst.NUM_PROPOSALS", 6)
    batch = _batch(model.num_classes, 0, sizes=((96, 128, 2), (80, 96, 0), (64, 64, 9)))
    torch.manual_seed(0)
    random.seed(0)  # the subsampling shuffles with python's RNG, as the original
    boxes, t = ref.original_noisy_boxes(model, batch)
    assert boxes.shape == (3, 6, 4) and t.shape == (3,) and t.dtype == torch.long
    assert ((t >= 0) & (t < model.num_timesteps)).all() and len(set(t.tolist())) > 1
    for b, x in zip(boxes, batch):
        h, w = x["image"].shape[-2:]
        signal = ref.xyxy_to_cxcywh(b / torch.tensor([w, h, w, h]))
        assert (signal >= -1e-6).all() and (signal <= 1 + 1e-6).all()
    torch.manual_seed(0)
    random.seed(0)
    again, t_again = ref.original_noisy_boxes(model, batch)
    assert torch.equal(again, boxes) and torch.equal(t_again, t)


def test_original_optimizer_matches_the_original_construction():
    """One group per tensor, backbone lr scaled, weight decay everywhere (norms too), default AdamW, clipping."""
    cfg = tiny_cfg("SOLVER.BACKBONE_MULTIPLIER", 0.5)
    model = build_model(cfg)
    optimizer = ref.original_optimizer(cfg, model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(optimizer.param_groups) == len(trainable)
    for (name, p), group in zip(trainable, optimizer.param_groups):
        assert group["params"] == [p] and group["weight_decay"] == cfg.SOLVER.WEIGHT_DECAY
        assert group["lr"] == cfg.SOLVER.BASE_LR * (0.5 if "backbone" in name else 1.0)
        assert not group["fused"] and group["foreach"] is None
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    optimizer.step()
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) <= cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE + 1e-4
