"""Optimizer construction: AdamW (or SGD) with a backbone lr multiplier and full-model gradient clipping."""
from __future__ import annotations

import itertools
from typing import Dict, List, Tuple, Type

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

__all__ = ["build_optimizer", "add_full_model_gradient_clipping", "param_groups"]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
               nn.modules.instancenorm._InstanceNorm)


def param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, weight_decay_norm: float, backbone_multiplier: float
) -> List[Dict]:
    """Trainable parameters grouped by (lr, weight decay): backbone lr x multiplier, norm layers' own decay.

    Few groups keep the multi-tensor optimizer kernels effective.
    """
    from detectron2.layers import FrozenBatchNorm2d

    groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
    seen = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES + (FrozenBatchNorm2d,))
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lr = base_lr * (backbone_multiplier if module_name.split(".")[0] == "backbone" else 1.0)
            groups.setdefault((lr, weight_decay_norm if is_norm else weight_decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def add_full_model_gradient_clipping(optim_cls: Type[torch.optim.Optimizer], max_norm: float):
    """Subclass of ``optim_cls`` whose step() first clips the global gradient norm over all its parameters."""

    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[group["params"] for group in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    return FullModelGradientClippingOptimizer


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER over the model's parameters; backbone lr scaled by SOLVER.BACKBONE_MULTIPLIER."""
    params = param_groups(
        model, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM,
        cfg.SOLVER.BACKBONE_MULTIPLIER,
    )
    # SOLVER.OPTIMIZER is ADAMW or SGD (check_config). The fused AdamW kernel does the same update as the
    # multi-tensor one, several times faster on CPU.
    optim_cls, kwargs = {
        "ADAMW": (torch.optim.AdamW, {"lr": cfg.SOLVER.BASE_LR, "fused": True}),
        "SGD": (torch.optim.SGD, {"lr": cfg.SOLVER.BASE_LR, "momentum": cfg.SOLVER.MOMENTUM, "foreach": True}),
    }[cfg.SOLVER.OPTIMIZER.upper()]
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        return add_full_model_gradient_clipping(optim_cls, clip.CLIP_VALUE)(params, **kwargs)
    return maybe_add_gradient_clipping(cfg, optim_cls(params, **kwargs))
