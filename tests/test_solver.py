"""Optimizer: parameter groups, full-model gradient clipping, and the fused AdamW equal to the plain update."""
from __future__ import annotations

import copy

import torch
from detectron2.modeling import build_model

from conftest import tiny_cfg
from diffusioninst import build_optimizer
from diffusioninst.solver import add_full_model_gradient_clipping, param_groups


def _model_with_grads(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(tiny_cfg("SOLVER.BACKBONE_MULTIPLIER", 0.1, "SOLVER.WEIGHT_DECAY_NORM", 0.0))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.05
    return model


def test_param_groups_scale_backbone_lr_and_norm_decay():
    model = _model_with_grads()
    groups = param_groups(model, 1e-4, 1e-4, 0.0, 0.1)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert lr_of[id(model.backbone.bottom_up.stem.conv1.weight)][0] == 1e-5
    assert lr_of[id(model.head.head_series[0].linear1.weight)] == (1e-4, 1e-4)
    assert lr_of[id(model.head.head_series[0].norm1.weight)] == (1e-4, 0.0)


def test_fused_adamw_with_clipping_equals_the_reference_update():
    """build_optimizer's fused AdamW step == clip_grad_norm_ then torch's single-tensor AdamW (foreach=False)."""
    model = _model_with_grads()
    reference = copy.deepcopy(model)  # (deepcopy does not copy .grad)
    for p, q in zip(model.parameters(), reference.parameters()):
        q.grad = p.grad.clone()
    cfg = tiny_cfg("SOLVER.BACKBONE_MULTIPLIER", 0.1, "SOLVER.WEIGHT_DECAY_NORM", 0.0)
    optimizer = build_optimizer(cfg, model)
    assert optimizer.defaults.get("fused") is True
    groups = param_groups(reference, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, 0.0, 0.1)
    plain = add_full_model_gradient_clipping(torch.optim.AdamW, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)(
        groups, lr=cfg.SOLVER.BASE_LR, foreach=False)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert norm > cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE  # the clipping is exercised
    for _ in range(3):
        optimizer.step()
        plain.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
