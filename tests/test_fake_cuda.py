"""Device placement without a GPU: the model's parts run under torch's FakeTensorMode with CUDA parameters and
inputs, where any CPU tensor that meets a CUDA one (other than a 0-dim scalar, as on a real GPU) raises
FakeTensorDeviceMismatchError. Sampling noise is passed explicitly (generators need a real GPU), and backward
passes are left to a GPU (autograd's engine asks the CUDA driver for streams); data-dependent code (the matcher's
loop, NMS, detectron2's ImageList padding) cannot run on fake tensors and is covered by the GPU check."""
from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from torch.func import functional_call

from diffusioninst.modeling.dynamic_mask_head import dynamic_mask_logits
from diffusioninst.modeling.matcher import in_boxes_and_centers, pad_targets
from diffusioninst.modeling.postprocess import masks_to_image_batched, select_topk

from conftest import tiny_cfg

CUDA = torch.device("cuda")
B, H, W = 2, 96, 128


def _fake_cuda(tensor: torch.Tensor) -> torch.Tensor:
    """A fake CUDA tensor with ``tensor``'s shape and dtype (made inside the fake mode)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=CUDA).requires_grad_(tensor.requires_grad)


@pytest.fixture(params=[True, False], ids=["cpu_kernels", "plain"])
def fake(request):
    """(the model in eval mode, its fake CUDA parameters and buffers, the mode), with CPU_KERNELS on (the default,
    whose layers fall back to the plain ops on CUDA) and off; the mode is entered."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.DiffusionInst.CPU_KERNELS", request.param, "MODEL.DiffusionInst.SAMPLE_STEP", 2)).eval()
    mode = FakeTensorMode()
    with mode:
        state = {k: _fake_cuda(v) for k, v in
                 [*model.named_parameters(), *model.named_buffers(remove_duplicate=False)]}
        yield model, state, mode


def _on_cuda(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cuda" for t in tensors)


class _Method(torch.nn.Module):
    """A module whose forward is ``m.<name>``, so that ``functional_call`` runs any method of ``m``."""

    def __init__(self, m: torch.nn.Module, name: str):
        super().__init__()
        self.m, self.name = m, name

    def forward(self, *args):
        return getattr(self.m, self.name)(*args)


def _call(model: torch.nn.Module, state, prefix: str, method: str, *args):
    """``model.<prefix>.<method>(*args)`` with the fake CUDA parameters and buffers under ``prefix`` swapped in."""
    module = model.get_submodule(prefix) if prefix else model
    start = len(prefix) + 1 if prefix else 0
    sub = {f"m.{k[start:]}": v for k, v in state.items() if not prefix or k.startswith(prefix + ".")}
    return functional_call(_Method(module, method), sub, args)


def _inputs(model, state):
    """Padded images (B, 3, H, W) on CUDA, the decoder's features and F_mask, each image's (w, h, w, h)."""
    images = torch.randn(B, 3, H, W, device=CUDA)
    features, mask_feats = _call(model, state, "", "extract_features", ImageList(images, [(H, W), (H - 8, W - 16)]))
    whwh = torch.tensor([[W, H, W, H], [W - 16, H - 8, W - 16, H - 8]], dtype=torch.float32, device=CUDA)
    return features, mask_feats, whwh


def test_the_fake_mode_catches_a_cpu_tensor_meeting_a_cuda_one(fake):
    with pytest.raises(FakeTensorDeviceMismatchError):
        torch.ones(3, device=CUDA) + torch.ones(3)


def test_backbone_and_mask_branch_on_cuda(fake):
    model, state, _ = fake
    features, mask_feats, _ = _inputs(model, state)
    assert _on_cuda(*features, mask_feats)
    assert mask_feats.shape == (B, 8, H // 4, W // 4)


def test_decoder_stages_mask_head_and_masks_on_cuda(fake):
    model, state, _ = fake
    features, mask_feats, whwh = _inputs(model, state)
    n = model.num_proposals
    boxes = torch.rand(B, n, 4, device=CUDA) * 50
    boxes[..., 2:] += boxes[..., :2]
    t = torch.tensor([10, 500], device=CUDA)
    logits, pred_boxes, filters = _call(model, state, "head", "forward", features, boxes, t, None, mask_feats, whwh)
    assert _on_cuda(logits, pred_boxes, filters)
    image_index = torch.arange(B, device=CUDA).repeat_interleave(n)
    mask_logits = dynamic_mask_logits(mask_feats, filters[-1].flatten(0, 1), image_index)
    assert _on_cuda(mask_logits)
    scores, labels, top_boxes, top_filters = select_topk(logits[-1][0], pred_boxes[-1][0], filters[-1][0], 5)
    masks = masks_to_image_batched(mask_feats[0], top_filters, model.mask_head_layout, (H, W), (150, 200),
                                   top_boxes)
    assert _on_cuda(masks) and masks.shape == (5, 150, 200)


def test_sampler_on_cuda_with_explicit_noise(fake):
    model, state, _ = fake
    features, mask_feats, whwh = _inputs(model, state)

    def decode(boxes, filter_signal, t):
        logits, pred_boxes, filters = _call(model, state, "head", "forward", features, boxes, t, filter_signal,
                                            mask_feats, whwh)
        return logits[-1], pred_boxes[-1], filters[-1]

    x = torch.randn(B, model.num_proposals, 4, device=CUDA)
    step_noise = torch.randn(1, 2, B, model.num_proposals, 4, device=CUDA)  # the second step's DDIM and renewal noise
    steps = _call(model, state, "sampler", "sample", decode, whwh, x, None, step_noise)
    assert len(steps) == 2 and _on_cuda(*(t for step in steps for t in step))


def test_losses_on_cuda(fake):
    model, state, _ = fake
    n, k = model.num_proposals, model.num_classes
    targets = [{"labels": torch.tensor([1, 0], device=CUDA), "boxes_xyxy": torch.tensor(
        [[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 60.0, 70.0]], device=CUDA), "image_size_xyxy": torch.tensor(
        [W, H, W, H], dtype=torch.float32, device=CUDA)} for _ in range(B)]
    gt = pad_targets(targets, CUDA, torch.float32)
    assert _on_cuda(gt.labels, gt.boxes, gt.valid, gt.whwh)
    logits = torch.randn(B, n, k, device=CUDA, requires_grad=True)
    boxes = (torch.rand(B, n, 4, device=CUDA) * 40).requires_grad_()
    filters = torch.randn(B, n, 153, device=CUDA, requires_grad=True)
    mask_feats = torch.randn(B, 8, H // 4, W // 4, device=CUDA, requires_grad=True)
    fg, inside = in_boxes_and_centers(boxes, gt.boxes)
    assert _on_cuda(fg, inside)
    # The matches (the matcher's output: its loop reads the data, which fake tensors do not have).
    img = torch.tensor([0, 0, 1], device=CUDA)
    matches = (img, torch.tensor([3, 7, 2], device=CUDA), torch.tensor([0, 1, 1], device=CUDA))
    crit = model.criterion
    target_masks = torch.zeros(3, H // 4, W // 4, device=CUDA)
    losses = {**crit.loss_labels(logits, gt, matches), **crit.loss_boxes(boxes, gt, matches),
              **crit.loss_masks(filters, mask_feats, target_masks, matches)}
    total = sum(losses.values())
    # (autograd's engine asks the CUDA driver for the device's streams: the backward needs a real GPU)
    assert _on_cuda(total, *losses.values()) and total.requires_grad
