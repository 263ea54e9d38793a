"""DiffusionInst end to end: equals the original code path, batched = per-image, trains on shapes, valid outputs."""
from __future__ import annotations

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances, pairwise_iou

from benchmarks import original_release as ref
from conftest import register_shapes_at, tiny_cfg, train_tiny_on_shapes


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _inputs():
    return [
        {"image": _image(96, 128, 0), "height": 192, "width": 256},
        {"image": _image(112, 96, 1), "height": 112, "width": 96},
        {"image": _image(96, 160, 2)},
        {"image": _image(80, 80, 3), "height": 60, "width": 60},
    ]


# The reference convolves contiguous tensors: compare the algorithms on the same memory layout (channels-last is
# compared with contiguous on its own in test_channels_last_matches_contiguous).
SAME_LAYOUT = ("TEST.CHANNELS_LAST", False)


def _eval_model(*opts, seed=0):
    torch.manual_seed(seed)
    model = build_model(tiny_cfg("TEST.DETECTIONS_PER_IMAGE", 0, *opts)).eval()
    with torch.no_grad():  # spread the scores so that box renewal keeps some boxes and drops others
        for stage in model.head.head_series:
            stage.class_logits.bias.normal_(0.0, 2.0)
    return model


def _assert_same_instances(a: Instances, b: Instances):
    assert a.image_size == b.image_size
    assert len(a) == len(b) and len(a) > 0
    ia, ib = a.scores.argsort(descending=True), b.scores.argsort(descending=True)
    torch.testing.assert_close(a.scores[ia], b.scores[ib], rtol=1e-5, atol=1e-6)
    assert torch.equal(a.pred_classes[ia], b.pred_classes[ib])
    torch.testing.assert_close(a.pred_boxes.tensor[ia], b.pred_boxes.tensor[ib], rtol=1e-5, atol=1e-3)
    ma, mb = a.pred_masks[ia].bool(), b.pred_masks[ib].bool()
    assert ma.shape == mb.shape
    assert (ma != mb).float().mean() < 1e-4, "masks differ"


@pytest.mark.parametrize("steps", [1, 4])
def test_inference_equals_original_code_path(steps):
    """Same weights and initial boxes: our batched path reproduces the original's (one image, original ensemble)."""
    model = _eval_model("MODEL.DiffusionInst.SAMPLE_STEP", steps, "MODEL.DiffusionInst.ENSEMBLE_LAST_STEP", False,
                        *SAME_LAYOUT)
    x = _inputs()[0]
    init = torch.randn(1, model.num_proposals, 4, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    expected = ref.original_inference(model, x, init, sample_steps=steps)
    ours = model.inference([x], init_boxes=init, generators=[torch.Generator().manual_seed(123)])[0]["instances"]
    _assert_same_instances(ours, expected)


@pytest.mark.parametrize("steps", [1, 4])
def test_capped_inference_keeps_the_original_top_instances(steps):
    """With TEST.DETECTIONS_PER_IMAGE, masks are computed for the kept instances only: the original's top ones."""
    cap = 8
    model = _eval_model("MODEL.DiffusionInst.SAMPLE_STEP", steps, "MODEL.DiffusionInst.ENSEMBLE_LAST_STEP", False,
                        *SAME_LAYOUT)
    model.max_detections = cap
    x = _inputs()[0]
    init = torch.randn(1, model.num_proposals, 4, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    expected = ref.original_inference(model, x, init, sample_steps=steps)
    assert len(expected) > cap
    ours = model.inference([x], init_boxes=init, generators=[torch.Generator().manual_seed(123)])[0]["instances"]
    assert len(ours) == cap
    _assert_same_instances(ours, expected[expected.scores.argsort(descending=True)[:cap]])


@pytest.mark.parametrize("steps", [1, 4])
def test_batch_equals_per_image(steps):
    model = _eval_model("MODEL.DiffusionInst.SAMPLE_STEP", steps)
    inputs = _inputs()
    init = torch.randn(len(inputs), model.num_proposals, 4, generator=torch.Generator().manual_seed(7))
    batched = model.inference(inputs, init_boxes=init, generators=[torch.Generator().manual_seed(i) for i in range(4)])
    for i, x in enumerate(inputs):
        single = model.inference([x], init_boxes=init[i : i + 1], generators=[torch.Generator().manual_seed(i)])
        _assert_same_instances(batched[i]["instances"], single[0]["instances"])


@pytest.mark.parametrize("steps,num_images", [(1, 1), (1, 4), (4, 1), (4, 4)])
def test_inference_returns_wellformed_instances(steps, num_images):
    model = _eval_model("MODEL.DiffusionInst.SAMPLE_STEP", steps, "TEST.DETECTIONS_PER_IMAGE", 15)
    inputs = _inputs()[:num_images]
    outputs = model(inputs)
    assert len(outputs) == num_images
    for x, out in zip(inputs, outputs):
        inst = out["instances"]
        h, w = x.get("height", x["image"].shape[1]), x.get("width", x["image"].shape[2])
        assert inst.image_size == (h, w)
        assert 0 < len(inst) <= 15
        assert inst.pred_masks.shape == (len(inst), h, w) and inst.pred_masks.dtype == torch.bool
        assert inst.scores.shape == (len(inst),) and (inst.scores[:-1] >= inst.scores[1:]).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < model.num_classes)).all()
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= w and boxes[:, 1::2].max() <= h
        # Masks are zero outside their box.
        for m, b in zip(inst.pred_masks, boxes.long()):
            inside = torch.zeros_like(m)
            inside[b[1] : b[3], b[0] : b[2]] = True
            assert not (m & ~inside).any()


def test_ensemble_includes_last_step_by_default():
    model = _eval_model("MODEL.DiffusionInst.SAMPLE_STEP", 3, "MODEL.DiffusionInst.USE_NMS", False)
    assert len(model.sampler.time_pairs) == 3
    seen = []
    orig = model.sampler.sample

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        seen.append(len(out))
        return out

    model.sampler.sample = spy
    x = _inputs()[:1]
    n_all = len(model.inference(x, generators=[torch.Generator().manual_seed(0)])[0]["instances"])
    model.sampler.ensemble_last_step = False
    n_orig = len(model.inference(x, generators=[torch.Generator().manual_seed(0)])[0]["instances"])
    assert seen == [3, 2]
    assert n_all > n_orig


def test_wrong_class_ids_are_named():
    model = _eval_model("MODEL.DiffusionInst.NUM_CLASSES", 2)
    model.train()
    inst = Instances((96, 128))
    from detectron2.structures import BitMasks, Boxes

    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 50.0, 50.0]]))
    inst.gt_classes = torch.tensor([3])
    inst.gt_masks = BitMasks(torch.zeros(1, 96, 128, dtype=torch.bool))
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        model([{"image": _image(96, 128, 0), "instances": inst}])


@pytest.mark.slow
def test_training_on_shapes_decreases_loss(shapes_root, monkeypatch):
    """Images of different sizes, some without instances: the loss falls over a few dozen iterations."""
    monkeypatch.setenv("DETECTRON2_DATASETS", shapes_root)
    register_shapes_at(shapes_root)
    assert any(len(d["annotations"]) == 0 for d in DatasetCatalog.get("shapes_train"))

    def check(losses):
        assert {"loss_ce", "loss_bbox", "loss_giou", "loss_masks", "loss_masks_0"} <= set(losses)

    model, batches, history = train_tiny_on_shapes(check_losses=check)
    assert len({tuple(x["image"].shape[1:]) for b in batches for x in b}) > 1
    first, last = sum(history[:4]) / 4, sum(history[-4:]) / 4
    assert last < 0.8 * first, f"loss did not decrease: {history[:4]} -> {history[-4:]}"

    model.eval()
    with torch.no_grad():
        outputs = model(batches[0])
    assert all(isinstance(o["instances"], Instances) for o in outputs)


def test_sampler_schedule_follows_the_model_to_its_device():
    """model.to(device) must move the DDIM schedule too (a plain attribute would stay on the CPU)."""
    model = _eval_model()
    assert not any(k.startswith("sampler.") for k in model.state_dict())
    model.to("meta")
    assert model.alphas_cumprod.device.type == "meta"
    for name in ("alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"):
        assert getattr(model.sampler, name).device.type == "meta", name


def test_bfloat16_autocast_inference_is_close_to_float32():
    """TEST.AMP (here bfloat16, which runs on CPU): the same top detections up to half-precision noise, in float32."""
    opts = ("TEST.DETECTIONS_PER_IMAGE", 10, "MODEL.DiffusionInst.USE_NMS", False)
    fp32 = _eval_model(*opts)
    bf16 = _eval_model(*opts, "TEST.AMP.ENABLED", True, "TEST.AMP.DTYPE", "bfloat16")
    bf16.load_state_dict(fp32.state_dict())
    x = _inputs()[:2]
    init = torch.randn(2, fp32.num_proposals, 4, generator=torch.Generator().manual_seed(3))
    a = fp32.inference(x, init_boxes=init, generators=[torch.Generator().manual_seed(i) for i in range(2)])
    b = bf16.inference(x, init_boxes=init, generators=[torch.Generator().manual_seed(i) for i in range(2)])
    for ra, rb in zip(a, b):
        ia, ib = ra["instances"], rb["instances"]
        assert ib.scores.dtype == torch.float32 and ib.pred_boxes.tensor.dtype == torch.float32
        assert min(len(ia), len(ib)) >= 5  # empty boxes of the random model are dropped in either
        torch.testing.assert_close(ib.scores[:5], ia.scores[:5], atol=0.03, rtol=0.0)
        best_iou = pairwise_iou(ib.pred_boxes[:5], ia.pred_boxes).amax(1)
        assert (best_iou > 0.8).float().mean() >= 0.8, best_iou


@pytest.mark.parametrize("opts", [(), ("MODEL.DiffusionInst.FILTER_DENOISING", True, "MODEL.DiffusionInst.USE_BOX_LOSS", False)])
def test_training_under_autocast_gives_float32_losses_and_gradients(opts):
    """The SOLVER.AMP path (autocast; bfloat16 here, as it runs on CPU): finite float32 losses, gradients flow."""
    from detectron2.structures import BitMasks, Boxes

    model = build_model(tiny_cfg(*opts))
    inst = Instances((96, 128))
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[0, 10:40, 20:50] = masks[1, 50:90, 60:120] = True
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 10.0, 50.0, 40.0], [60.0, 50.0, 120.0, 90.0]]))
    inst.gt_classes = torch.tensor([0, 2])
    inst.gt_masks = BitMasks(masks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([{"image": _image(96, 128, 0), "instances": inst}])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grad = model.head.head_series[0].controller.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_channels_last_matches_contiguous():
    """TEST.CHANNELS_LAST: the backbone sees a channels-last input, the decoder contiguous features; same detections."""
    ours, plain = _eval_model(), _eval_model(*SAME_LAYOUT)
    assert ours.channels_last and not plain.channels_last
    seen = []
    ours.backbone.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    images, _ = ours.preprocess_image(_inputs()[:1])
    with torch.no_grad():
        features, mask_feats = ours.extract_features(images)
    assert seen == [True] and all(f.is_contiguous() for f in features) and mask_feats.is_contiguous()
    x = _inputs()[0]
    init = torch.randn(1, ours.num_proposals, 4, generator=torch.Generator().manual_seed(5))
    got = ours.inference([x], init_boxes=init, generators=[torch.Generator().manual_seed(1)])[0]["instances"]
    expected = plain.inference([x], init_boxes=init, generators=[torch.Generator().manual_seed(1)])[0]["instances"]
    _assert_same_instances(got, expected)


@pytest.mark.slow
def test_compiled_backbone_at_inference_only(monkeypatch):
    """TEST.COMPILE: inference runs torch.compile's backbone (here its eager backend: the wiring, not inductor's
    code generation); training and state_dict use the module itself; copies drop the compiled wrapper."""
    import copy

    compiled_calls = []
    real_compile = torch.compile

    def compile_eagerly(module, **kwargs):
        compiled_calls.append(module)
        return real_compile(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    ours, plain = _eval_model("TEST.COMPILE", True), _eval_model()
    keys = list(ours.state_dict())
    x = _inputs()[0]
    init = torch.randn(1, ours.num_proposals, 4, generator=torch.Generator().manual_seed(5))
    got = ours.inference([x], init_boxes=init, generators=[torch.Generator().manual_seed(1)])[0]["instances"]
    expected = plain.inference([x], init_boxes=init, generators=[torch.Generator().manual_seed(1)])[0]["instances"]
    assert compiled_calls == [ours.backbone]
    _assert_same_instances(got, expected)
    ours.inference([x], init_boxes=init, generators=[torch.Generator().manual_seed(1)])
    assert len(compiled_calls) == 1, "compiled once"
    assert list(ours.state_dict()) == keys and "_compiled_backbone_module" not in dict(ours.named_modules())
    clone = copy.deepcopy(ours)
    assert "_compiled_backbone_module" not in clone.__dict__ and "_compiled_backbone_module" in ours.__dict__
    ours.train()
    images, _ = ours.preprocess_image(_inputs()[:1])
    ours.extract_features(images)
    assert len(compiled_calls) == 1, "training does not use the compiled backbone"
