"""Mask branch: fuses FPN levels into F_mask (c channels at stride 4), the input of the dynamic mask head."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["aligned_bilinear", "MaskRefine", "MaskTower"]


def aligned_bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """CondInst's aligned upsampling of (B, C, H, W) by an integer factor to (B, C, H*f, W*f).

    Pixel centres stay aligned with the input grid (unlike align_corners=False), which matters
    because F_mask at stride 4 is compared with masks sampled at offset 2.
    """
    if x.dim() != 4:
        raise ValueError(f"aligned_bilinear expects (B, C, H, W), got shape {tuple(x.shape)}")
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"aligned_bilinear needs a positive integer factor, got {factor}")
    if factor == 1:
        return x
    h, w = x.shape[2:]
    x = F.pad(x, pad=(0, 1, 0, 1), mode="replicate")
    oh, ow = factor * h + 1, factor * w + 1
    x = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=True)
    x = F.pad(x, pad=(factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : oh - 1, : ow - 1]


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class MaskRefine(nn.ModuleList):
    """One 3x3 conv+BN+ReLU per input level; coarser levels are upsampled to the first one and summed."""

    def __init__(self, num_levels: int, in_channels: int, channels: int):
        super().__init__([_conv_bn_relu(in_channels, channels) for _ in range(num_levels)])

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: one (B, in_channels, H_l, W_l) map per level, finest first -> (B, channels, H_0, W_0)."""
        if len(features) != len(self):
            raise ValueError(f"MaskRefine built for {len(self)} levels, got {len(features)} feature maps")
        fused = self[0](features[0])
        th, tw = fused.shape[2:]
        for block, x in zip(list(self)[1:], features[1:]):
            x = block(x)
            h, w = x.shape[2:]
            if th % h or tw % w or th // h != tw // w:
                raise ValueError(f"mask branch level of size {(h, w)} does not divide the finest level {(th, tw)}")
            fused = fused + aligned_bilinear(x, th // h)
        return fused


class MaskTower(nn.Sequential):
    """num_convs x (3x3 conv+BN+ReLU) then a 1x1 conv to the c channels of F_mask."""

    def __init__(self, channels: int, num_convs: int, out_channels: int):
        layers = [_conv_bn_relu(channels, channels) for _ in range(num_convs)]
        layers.append(nn.Conv2d(channels, out_channels, kernel_size=1, stride=1))
        super().__init__(*layers)
