"""Filter denoising (beyond the paper): filters in the diffusion state, and the variant without box losses."""
from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from conftest import register_shapes_at, tiny_cfg, train_tiny_on_shapes
from diffusioninst.modeling.diffusion import (
    ddim_step, diffusion_buffers, predict_noise_from_start, signal_from_boxes, signal_from_filters,
)
from diffusioninst.modeling.dynamic_mask_head import dynamic_mask_logits
from diffusioninst.modeling.postprocess import mask_extent_boxes
from diffusioninst.modeling.sampler import DDIMSampler

FILTERS = ("MODEL.DiffusionInst.FILTER_DENOISING", True)
NO_BOX_LOSS = ("MODEL.DiffusionInst.USE_BOX_LOSS", False)
VARIANTS = {"filters": FILTERS, "filters_no_box_loss": FILTERS + NO_BOX_LOSS}
P = 153


def _image(h, w, seed):
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _training_input(h, w, seed, num_instances):
    inst = Instances((h, w))
    masks = torch.zeros(num_instances, h, w, dtype=torch.bool)
    boxes = []
    for i in range(num_instances):
        x0, y0 = 8 + 14 * i, 10 + 9 * i
        masks[i, y0 : y0 + 30, x0 : x0 + 24] = True
        boxes.append([x0, y0, x0 + 24, y0 + 30])
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.arange(num_instances) % 3
    inst.gt_masks = BitMasks(masks)
    return {"image": _image(h, w, seed), "instances": inst}


def test_filter_signal_mapping():
    filters = torch.tensor([[[-10.0, -4.0, -1.0, 0.0, 2.0, 4.0, 9.0]]])
    signal = signal_from_filters(filters, scale=2.0, filter_range=4.0)
    torch.testing.assert_close(signal, torch.tensor([[[-2.0, -2.0, -0.5, 0.0, 1.0, 2.0, 2.0]]]))


def test_mask_extent_boxes_stride_fallback_and_search_region():
    logits = torch.full((3, 10, 12), -1.0)
    logits[0, 2:5, 3:7] = 1.0  # rows 2..4, columns 3..6
    logits[1, 0, 0] = 0.5
    logits[1, 9, 11] = 0.5  # two far apart cells: the box encloses both
    fallback = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [5.0, 6.0, 7.0, 8.0]])
    boxes = mask_extent_boxes(logits, 4, fallback)
    torch.testing.assert_close(boxes, torch.tensor([[12.0, 8.0, 28.0, 20.0], [0.0, 0.0, 48.0, 40.0], [5.0, 6.0, 7.0, 8.0]]))
    # Within a region only the cells whose centres (4j + 2, 4i + 2) lie inside it count.
    region = torch.tensor([[0.0, 0.0, 20.0, 100.0], [30.0, 30.0, 48.0, 40.0], [0.0, 0.0, 48.0, 40.0]])
    boxes = mask_extent_boxes(logits, 4, fallback, region)
    torch.testing.assert_close(boxes, torch.tensor([[12.0, 8.0, 20.0, 20.0], [44.0, 36.0, 48.0, 40.0], [5.0, 6.0, 7.0, 8.0]]))


def _sampler(filter_range, steps=3, renewal=True):
    buffers = diffusion_buffers(1000)
    return DDIMSampler(
        buffers["alphas_cumprod"], buffers["sqrt_recip_alphas_cumprod"], buffers["sqrt_recipm1_alphas_cumprod"],
        sample_steps=steps, box_renewal=renewal, filter_range=filter_range,
    )


def test_ddim_update_on_filters_and_renewal_refills_them():
    """The second step's filter input is the DDIM update of the first step's predicted filters (kept proposals)
    or fresh noise (renewed ones), with exactly the noise the generators give."""
    sampler = _sampler(filter_range=4.0, steps=2)
    b, n, scale = 2, 6, sampler.scale
    whwh = torch.tensor([[64.0, 48.0, 64.0, 48.0], [40.0, 40.0, 40.0, 40.0]])
    x0 = torch.randn(b, n, 4 + P, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([[True, False, True, True, False, True], [False, False, True, False, False, False]])
    pred_boxes = torch.tensor([[4.0, 4.0, 30.0, 20.0]]).repeat(b, n, 1)
    pred_filters = torch.randn(b, n, P, generator=torch.Generator().manual_seed(2)) * 3
    logits = torch.where(keep[..., None], 3.0, -3.0).expand(b, n, 2).clone()
    seen = []

    def decode(boxes, filter_signal, t):
        seen.append((boxes.clone(), filter_signal.clone(), t.clone()))
        return logits, pred_boxes, pred_filters

    outputs = sampler.sample(decode, whwh, x0, [torch.Generator().manual_seed(10 + i) for i in range(b)])
    assert len(outputs) == 2 and len(seen) == 2
    torch.testing.assert_close(seen[0][1], x0[..., 4:])
    (t, t_next), _ = sampler.time_pairs
    time = torch.full((b,), t, dtype=torch.long)
    x_start = torch.cat([signal_from_boxes(pred_boxes / whwh[:, None, :], scale),
                         signal_from_filters(pred_filters, scale, 4.0)], -1)
    pred_noise = predict_noise_from_start(x0, time, x_start, sampler.sqrt_recip_alphas_cumprod,
                                          sampler.sqrt_recipm1_alphas_cumprod)
    alpha, alpha_next = sampler.alphas_cumprod[t], sampler.alphas_cumprod[t_next]
    for i in range(b):
        g = torch.Generator().manual_seed(10 + i)
        k = int(keep[i].sum())
        noise = torch.randn((k, 4 + P), generator=g)
        refill = torch.randn((n - k, 4 + P), generator=g)
        expected = torch.cat([ddim_step(x_start[i, keep[i]], pred_noise[i, keep[i]], alpha, alpha_next, 1.0, noise),
                              refill])
        torch.testing.assert_close(seen[1][1][i], expected[:, 4:], rtol=1e-5, atol=1e-5)


def _model(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(*opts))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_head_shapes_and_parameters(variant):
    model = _model(*VARIANTS[variant])
    d, stages = 64, 2
    assert len(model.head.filter_embed) == stages
    assert all(tuple(e.weight.shape) == (d, P) for e in model.head.filter_embed)
    extra = {k for k in model.state_dict() if k.startswith("head.filter_embed.")}
    default_keys = set(_model().state_dict())
    assert set(model.state_dict()) - default_keys == extra and len(extra) == 2 * stages
    box_free = variant == "filters_no_box_loss"
    assert all(p.requires_grad != box_free for s in model.head.head_series for p in s.bboxes_delta.parameters())

    images, whwh = model.preprocess_image([{"image": _image(96, 128, 0)}, {"image": _image(96, 128, 1)}])
    features, mask_feats = model.extract_features(images)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0]]).repeat(2, 20, 1)
    signal = torch.randn(2, 20, P)
    logits, pred_boxes, filters = model.head(features, boxes, torch.tensor([5, 900]), signal, mask_feats, whwh)
    assert logits.shape == (stages, 2, 20, 4) and pred_boxes.shape == (stages, 2, 20, 4)
    assert filters.shape == (stages, 2, 20, P)
    with pytest.raises(ValueError, match="filter_signal"):
        model.head(features, boxes, torch.tensor([5, 900]), None, mask_feats, whwh)
    if box_free:  # each stage's boxes: the extent of its masks within 1.5x its input box (or that box if empty)
        masks = dynamic_mask_logits(mask_feats, filters[0].flatten(0, 1), torch.arange(2).repeat_interleave(20))
        region = torch.tensor([[-2.5, 0.0, 72.5, 60.0]]).repeat(40, 1)
        expected = mask_extent_boxes(masks, 4, boxes.flatten(0, 1), region).view(2, 20, 4)
        torch.testing.assert_close(pred_boxes[0], torch.minimum(expected, whwh[:, None, :]))
        assert (pred_boxes[0][..., 2] <= 76).all() and (pred_boxes[0][..., 3] <= 64).all()


def test_filter_embeddings_start_at_zero_then_the_signal_steers_the_prediction():
    """Zero-initialised embeddings: the untrained model is the paper's; once they are non-zero the filters matter."""
    model = _model(*FILTERS).eval()
    paper = _model().eval()
    incompatible = model.load_state_dict(paper.state_dict(), strict=False)
    assert set(incompatible.missing_keys) == {k for k in model.state_dict() if k.startswith("head.filter_embed.")}
    images, whwh = model.preprocess_image([{"image": _image(96, 128, 0)}])
    features, mask_feats = model.extract_features(images)
    boxes = torch.tensor([[[10.0, 10.0, 60.0, 50.0]]]).repeat(1, 20, 1)
    t = torch.tensor([100])
    a = model.head(features, boxes, t, torch.zeros(1, 20, P), mask_feats, whwh)
    b = model.head(features, boxes, t, torch.ones(1, 20, P), mask_feats, whwh)
    for x, y, z in zip(a, b, paper.head(features, boxes, t)):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x, z)
    with torch.no_grad():
        for embed in model.head.filter_embed:
            embed.weight.normal_(0.0, 0.1)
    a = model.head(features, boxes, t, torch.zeros(1, 20, P), mask_feats, whwh)
    b = model.head(features, boxes, t, torch.ones(1, 20, P), mask_feats, whwh)
    assert not torch.allclose(a[2], b[2]) and not torch.allclose(a[0], b[0])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_losses_without_box_terms_when_box_loss_is_off(variant):
    model = _model(*VARIANTS[variant])
    losses = model([_training_input(96, 128, 0, 3), _training_input(112, 96, 1, 0)])
    has_box = variant == "filters"
    assert ("loss_bbox" in losses) == has_box and ("loss_giou_0" in losses) == has_box
    assert {"loss_ce", "loss_masks", "loss_ce_0", "loss_masks_0"} <= set(losses)
    total = sum(losses.values())
    total.backward()
    assert model.head.filter_embed[0].weight.grad is not None and model.head.filter_embed[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_batch_equals_per_image_with_filters(variant):
    model = _model(*VARIANTS[variant], "MODEL.DiffusionInst.SAMPLE_STEP", 2, "TEST.DETECTIONS_PER_IMAGE", 0).eval()
    with torch.no_grad():
        for stage in model.head.head_series:
            stage.class_logits.bias.normal_(0.0, 2.0)
    inputs = [{"image": _image(96, 128, 0)}, {"image": _image(96, 128, 1), "height": 48, "width": 64}]
    init = torch.randn(2, model.num_proposals, 4, generator=torch.Generator().manual_seed(3))
    batched = model.inference(inputs, init_boxes=init, generators=[torch.Generator().manual_seed(i) for i in range(2)])
    for i, x in enumerate(inputs):
        single = model.inference([x], init_boxes=init[i : i + 1], generators=[torch.Generator().manual_seed(i)])
        a, b = batched[i]["instances"], single[0]["instances"]
        assert len(a) == len(b) > 0
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_both_variants_train_on_shapes_and_predict_valid_instances(variant, shapes_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", shapes_root)
    register_shapes_at(shapes_root)
    model, batches, history = train_tiny_on_shapes(*VARIANTS[variant])
    first, last = sum(history[:4]) / 4, sum(history[-4:]) / 4
    assert last < 0.8 * first, f"loss did not decrease: {history[:4]} -> {history[-4:]}"

    for steps in (1, 4):
        trained = build_model(tiny_cfg(*VARIANTS[variant], "MODEL.DiffusionInst.NUM_PROPOSALS", 16,
                                       "MODEL.DiffusionInst.SAMPLE_STEP", steps)).eval()
        trained.load_state_dict(model.state_dict())
        with torch.no_grad():
            outputs = trained([{k: v for k, v in x.items() if k != "instances"} for x in batches[0]])
        for x, out in zip(batches[0], outputs):
            inst = out["instances"]
            h, w = x["height"], x["width"]
            assert inst.image_size == (h, w) and len(inst) > 0
            assert inst.pred_masks.shape == (len(inst), h, w)
            boxes = inst.pred_boxes.tensor
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert boxes[:, 0::2].max() <= w and boxes[:, 1::2].max() <= h and boxes.min() >= 0
            assert ((inst.pred_classes >= 0) & (inst.pred_classes < 4)).all()
