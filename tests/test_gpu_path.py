"""The GPU path on CPU: batched post-processing and the sync-free RoI pooler give the CPU path's results; the op and
host-sync budgets of issue 27, counted by benchmarks/count_ops.py (deterministic) on the COCO R50 config."""
from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

from benchmarks.count_ops import count_ops
from benchmarks.runs import random_images, random_training_inputs
from diffusioninst import build_optimizer
from diffusioninst.layers import LevelSelectROIPooler, use_cpu_kernels
from diffusioninst.modeling.dynamic_mask_head import DynamicMaskWindows
from diffusioninst.modeling.postprocess import detections_to_instances, masks_to_image, masks_to_image_batched

from conftest import load_cfg, tiny_cfg

LAYOUT = (8, 8, 3)


def _case(num: int, low, output_size, seed: int = 0):
    """Mask features (8, h, w), filters (num, 153) and boxes (num, 4) in output coordinates, some at the border."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(8, *low, generator=g)
    filters = torch.randn(num, 153, generator=g) * 0.6
    h, w = output_size
    xy = torch.rand(num, 2, generator=g) * torch.tensor([w, h])
    boxes = torch.cat([xy, xy + torch.rand(num, 2, generator=g) * torch.tensor([w, h])], 1)
    if num >= 3:
        boxes[0] = torch.tensor([0.0, 0.0, w, h])  # the whole image: every border
        boxes[1] = torch.tensor([w - 0.7, 3.0, w - 0.2, 9.0])  # thinner than a pixel: empty after truncation
        boxes[2] = torch.tensor([w - 5.0, h - 5.0, w, h])  # the bottom-right corner
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return feats, filters, boxes


@pytest.mark.parametrize("num,low,input_size,output_size", [
    (12, (24, 32), (96, 128), (96, 128)),  # same size
    (12, (24, 32), (93, 125), (186, 250)),  # padded input, upscaled output
    (12, (25, 30), (99, 117), (61, 73)),  # downscaled output
    (9, (40, 48), (160, 190), (19, 23)),  # strong downscale: output pixels skip cells
    (5, (8, 8), (32, 29), (480, 640)),  # large upscaling
    (1, (24, 32), (96, 128), (96, 128)),  # one detection
    (0, (24, 32), (96, 128), (96, 128)),  # none
])
def test_batched_masks_equal_the_sparse_path(num, low, input_size, output_size):
    feats, filters, boxes = _case(num, low, output_size)
    sparse = masks_to_image(DynamicMaskWindows(feats, filters, *LAYOUT), input_size, output_size, boxes)
    batched = masks_to_image_batched(feats, filters, LAYOUT, input_size, output_size, boxes)
    assert batched.dtype == torch.bool and batched.shape == (num, *output_size)
    assert torch.equal(batched, sparse)
    if num >= 3:
        assert sparse.any() and not batched[1].any()


def test_batched_masks_chunk_over_detections(monkeypatch):
    from diffusioninst.modeling import postprocess

    feats, filters, boxes = _case(7, (24, 32), (96, 128))
    whole = masks_to_image_batched(feats, filters, LAYOUT, (96, 128), (96, 128), boxes)
    monkeypatch.setattr(postprocess, "MASK_CHUNK_ELEMENTS", 3 * 96 * 128)  # chunks of 3 detections
    assert torch.equal(masks_to_image_batched(feats, filters, LAYOUT, (96, 128), (96, 128), boxes), whole)


def test_batched_detections_equal_the_sparse_path_without_any_detection():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g)
    boxes = torch.tensor([[5.0, 5.0, 5.0, 9.0]]).repeat(6, 1)  # zero width: every box is empty
    kwargs = dict(num_proposals=6, nms_thresh=0.5, use_nms=True, max_detections=4, mask_head_layout=LAYOUT,
                  mask_threshold=0.5)
    steps = [(logits, boxes, torch.randn(6, 153, generator=g))]
    feats = torch.randn(8, 8, 8, generator=g)
    for batched in (False, True):
        out = detections_to_instances(steps, feats, (32, 32), (64, 64), batched=batched, **kwargs)
        assert len(out) == 0 and out.pred_masks.shape == (0, 64, 64)


@pytest.mark.parametrize("steps,cpu_kernels", [(1, True), (1, False), (4, True), (4, False)])
def test_batched_postprocess_gives_the_cpu_paths_detections(steps, cpu_kernels):
    """Whole inference (4 steps: box renewal and the ensemble), images of two sizes resized at output."""
    cfg = tiny_cfg("MODEL.DiffusionInst.SAMPLE_STEP", steps, "MODEL.DiffusionInst.CPU_KERNELS", cpu_kernels)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    inputs = [{"image": torch.randint(0, 256, (3, 96, 128), generator=g, dtype=torch.uint8), "height": 150,
               "width": 200, "image_id": 0},
              {"image": torch.randint(0, 256, (3, 112, 96), generator=g, dtype=torch.uint8), "height": 40,
               "width": 34, "image_id": 1}]
    outs = {}
    for mode in ("sparse", "batched"):
        model.postprocess = mode
        assert model.batched_postprocess == (mode == "batched")
        outs[mode] = [o["instances"] for o in model.inference(inputs)]
    for a, b in zip(outs["sparse"], outs["batched"]):
        assert len(a) > 0 and len(a) == len(b)
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.pred_masks, b.pred_masks) and a.pred_masks.any()


def test_postprocess_auto_is_sparse_only_on_the_cpu_kernels():
    assert not build_model(tiny_cfg()).batched_postprocess
    assert build_model(tiny_cfg("MODEL.DiffusionInst.CPU_KERNELS", False)).batched_postprocess
    assert build_model(tiny_cfg("MODEL.DiffusionInst.POSTPROCESS", "batched")).batched_postprocess


def test_the_counter_counts_kernels_and_classifies_syncs():
    x = torch.arange(12.0).view(3, 4)

    def call():
        y = x.t()[1:]  # views: no kernel
        z = (y * 2 + 1).relu()  # 3 kernels
        mask = z > 5  # 1
        z[mask].sum()  # bool-mask index (sync) + sum
        torch.nonzero(mask)  # sync
        int(z.sum())  # sum + _local_scalar_dense (sync)
        z.tolist()  # a host read, no aten op
        torch.arange(3).repeat_interleave(2)  # arange + repeat_interleave with int repeats: no sync
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0]))  # with a tensor: sync
        torch.empty(5)  # an allocation: no kernel

    counts, _ = count_ops(call)
    assert "aten::t" not in counts.kernels and "aten::slice" not in counts.kernels
    assert "aten::empty" not in counts.kernels
    assert counts.kernels["aten::mul"] == 1 and counts.kernels["aten::sum"] == 2
    assert counts.syncs == {"aten::index": 1, "aten::nonzero": 1, "aten::_local_scalar_dense": 1,
                            "host::tolist": 1, "aten::repeat_interleave": 1}


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_level_select_pooler_equals_detectron2s(cpu_kernels):
    g = torch.Generator().manual_seed(0)
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    feats = [torch.randn(2, 16, 64 // s, 80 // s, generator=g, requires_grad=True) for s in (1, 2, 4, 8)]
    xy = torch.rand(2, 30, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 4 + torch.rand(2, 30, 2, generator=g) * 200], -1)  # every level gets boxes
    ours = use_cpu_kernels(LevelSelectROIPooler((7, 7), scales, 2, "ROIAlignV2"), cpu_kernels)
    stock = ROIPooler((7, 7), scales, 2, "ROIAlignV2")
    a = ours(feats, [Boxes(b) for b in boxes])
    grads_a = torch.autograd.grad(a.square().sum(), feats)
    b = stock(feats, [Boxes(b) for b in boxes])
    grads_b = torch.autograd.grad(b.square().sum(), feats)
    assert torch.equal(a, b)
    for ga, gb in zip(grads_a, grads_b):  # with the CPU kernels: their sparse-matrix backward, another sum order
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4)


# Budgets of issue 27 for the COCO R50 config on the GPU path (CPU_KERNELS False): op counts do not depend on the
# image size, so a 128x192 image and fewer proposals hold the full-size budgets (README: 800x1216, 500 proposals).
R50 = ("diffinst.coco.res50.5x.yaml", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
       "MODEL.DiffusionInst.CPU_KERNELS", False)
MAX_INFERENCE_OPS, MAX_INFERENCE_SYNCS = 1500, 20
MAX_TRAIN_OPS, MAX_TRAIN_SYNCS = 5475, 135


def _inference_counts(*opts, proposals: int = 100):
    torch.manual_seed(0)
    model = build_model(load_cfg(*R50, "MODEL.DiffusionInst.NUM_PROPOSALS", proposals, *opts)).eval()
    image = random_images(1, (128, 192))
    # Initial boxes near the image's centre: with random weights, fewer boxes end up outside the image (empty).
    init = 0.3 * torch.randn(1, proposals, 4, generator=torch.Generator().manual_seed(0))
    counts, out = count_ops(lambda: model.inference(image, init_boxes=init), model)
    return counts, len(out[0]["instances"])


def test_inference_op_and_sync_budgets_on_the_r50_config(monkeypatch):
    from diffusioninst.modeling import postprocess

    # Chunks of as many detections as at 800x1216 (the image is 128x192).
    monkeypatch.setattr(postprocess, "MASK_CHUNK_ELEMENTS", postprocess.MASK_CHUNK_ELEMENTS * 128 * 192 // (800 * 1216))
    few, n_few = _inference_counts("TEST.DETECTIONS_PER_IMAGE", 10)
    many, n_many = _inference_counts("TEST.DETECTIONS_PER_IMAGE", 300, "MODEL.DiffusionInst.USE_NMS", False,
                                     proposals=500)
    assert n_few == 10 and n_many == 300
    for counts in (few, many):
        assert counts.num_kernels <= MAX_INFERENCE_OPS and counts.num_syncs <= MAX_INFERENCE_SYNCS, counts.as_dict()
    assert abs(many.num_kernels - few.num_kernels) <= 0.05 * few.num_kernels
    assert many.num_syncs <= few.num_syncs
    four, _ = _inference_counts("MODEL.DiffusionInst.SAMPLE_STEP", 4)
    one, _ = _inference_counts()
    per_step = one.phase_kernels["decoder"]
    assert four.phase_kernels["decoder"] <= 4 * per_step
    assert four.phase_kernels["postprocess"] <= 1.2 * one.phase_kernels["postprocess"]


def _train_counts(batch: int):
    torch.manual_seed(0)
    cfg = load_cfg(*R50, "MODEL.DiffusionInst.NUM_PROPOSALS", 20)
    model = build_model(cfg).train()
    inputs = random_training_inputs(batch, (64, 64), 80)
    optimizer = build_optimizer(cfg, model)

    def iteration():
        total = sum(model(inputs).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()

    iteration()  # the optimizer's state
    return count_ops(iteration)[0]


def test_training_op_and_sync_budgets_on_the_r50_config():
    two, eight = _train_counts(2), _train_counts(8)
    assert two.num_kernels <= MAX_TRAIN_OPS and two.num_syncs <= MAX_TRAIN_SYNCS, two.as_dict()
    # Syncs do not grow with the batch (the matcher's loop may take a different number of rounds: +-1 per stage).
    assert eight.num_syncs <= two.num_syncs + 6, (two.as_dict(), eight.as_dict())
