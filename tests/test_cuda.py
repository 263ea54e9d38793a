"""On a CUDA GPU (marked ``cuda``: skipped elsewhere, run by ``make gpu-check``): the GPU path's results equal the CPU
path's, and one inference call stays within its host-sync budget."""
from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model

from benchmarks.count_ops import count_ops
from diffusioninst.modeling.dynamic_mask_head import DynamicMaskWindows
from diffusioninst.modeling.postprocess import masks_to_image, masks_to_image_batched

from conftest import tiny_cfg

pytestmark = pytest.mark.cuda


def test_batched_masks_on_cuda_equal_the_cpu_sparse_path():
    g = torch.Generator().manual_seed(0)
    feats, filters = torch.randn(8, 24, 32, generator=g), 0.6 * torch.randn(9, 153, generator=g)
    xy = torch.rand(9, 2, generator=g) * torch.tensor([250.0, 186.0])
    boxes = torch.cat([xy, xy + 60], 1).clamp(max=186)
    cpu = masks_to_image(DynamicMaskWindows(feats, filters), (93, 125), (186, 250), boxes)
    torch.backends.cuda.matmul.allow_tf32 = False
    cuda = masks_to_image_batched(feats.cuda(), filters.cuda(), (8, 8, 3), (93, 125), (186, 250), boxes.cuda())
    assert cuda.is_cuda and (cuda.cpu() != cpu).float().mean() < 1e-4  # pixels at the threshold may round apart


def test_inference_on_cuda_within_the_sync_budget():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.DEVICE", "cuda")).eval()
    image = {"image": torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8), "height": 96, "width": 128,
             "image_id": 0}
    init = torch.randn(1, model.num_proposals, 4)
    counts, out = count_ops(lambda: model.inference([image], init_boxes=init), model)
    assert out[0]["instances"].pred_masks.is_cuda
    assert counts.num_syncs <= 20, counts.as_dict()
