"""Exponential moving average of model weights, checkpointed with the trainer and used for evaluation."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch
from detectron2.engine import HookBase
from torch import nn

__all__ = ["EMAHook", "ModelEMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, or the model itself."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class ModelEMA:
    """EMA of every floating-point parameter and buffer: ema = decay * ema + (1 - decay) * current.

    Integer buffers (e.g. BatchNorm's step counter) are copied. ``state_dict``/``load_state_dict`` make it a
    fvcore checkpointable, so it is saved and resumed with the model, optimizer and scheduler.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, device: str = ""):
        self.decay = decay
        self.device = device or None
        self.state: Dict[str, torch.Tensor] = {
            k: v.detach().clone().to(self.device or v.device) for k, v in unwrap_model(model).state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        for name, value in unwrap_model(model).state_dict().items():
            ema = self.state[name]
            value = value.detach().to(ema.device)
            if ema.is_floating_point():
                ema.lerp_(value, 1.0 - self.decay)
            else:
                ema.copy_(value)

    @contextlib.contextmanager
    def apply_to(self, model: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into ``model`` (e.g. for evaluation), then restore its own."""
        module = unwrap_model(model)
        backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.state)
        try:
            yield
        finally:
            module.load_state_dict(backup)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.state) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self.state))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, value in state_dict.items():
            self.state[name].copy_(value)


class EMAHook(HookBase):
    """Updates a ``ModelEMA`` after every optimizer step."""

    def __init__(self, ema: ModelEMA, model: nn.Module):
        self.ema = ema
        self.model = model

    def after_step(self) -> None:
        self.ema.update(self.model)
