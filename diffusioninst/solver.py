"""Optimizer construction: AdamW (or SGD) with a backbone lr multiplier and full-model gradient clipping."""
from __future__ import annotations

import itertools
from typing import Type

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["build_optimizer", "add_full_model_gradient_clipping"]


def add_full_model_gradient_clipping(optim_cls: Type[torch.optim.Optimizer], max_norm: float):
    """Subclass of ``optim_cls`` whose step() first clips the global gradient norm over all its parameters."""

    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[group["params"] for group in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    return FullModelGradientClippingOptimizer


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER over the model's parameters; backbone lr scaled by SOLVER.BACKBONE_MULTIPLIER."""
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
    )
    backbone_params = {id(p) for p in model.backbone.parameters()} if hasattr(model, "backbone") else set()
    for group in params:
        if any(id(p) in backbone_params for p in group["params"]):
            group["lr"] = group["lr"] * cfg.SOLVER.BACKBONE_MULTIPLIER
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {"lr": cfg.SOLVER.BASE_LR}
    elif name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"lr": cfg.SOLVER.BASE_LR, "momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        return add_full_model_gradient_clipping(optim_cls, clip.CLIP_VALUE)(params, **kwargs)
    return maybe_add_gradient_clipping(cfg, optim_cls(params, **kwargs))
