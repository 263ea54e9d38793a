"""CondInst-style dynamic mask head: per-instance 1x1 conv filters, predicted by the detector, run on mask features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "mask_head_param_layout", "num_mask_head_params", "parse_dynamic_params", "dynamic_mask_logits",
    "DynamicMaskWindows",
]

_CHUNK_ELEMENTS = 1 << 26
_CPU_CHUNK_ELEMENTS = 1 << 21


def mask_head_param_layout(in_channels: int = 8, channels: int = 8, num_layers: int = 3) -> tuple[list[int], list[int]]:
    """Sizes of each layer's weight and bias in the flat parameter vector -> (weight_nums, bias_nums)."""
    weight_nums: list[int] = []
    bias_nums: list[int] = []
    for layer in range(num_layers):
        fan_in = in_channels if layer == 0 else channels
        fan_out = 1 if layer == num_layers - 1 else channels
        weight_nums.append(fan_in * fan_out)
        bias_nums.append(fan_out)
    return weight_nums, bias_nums


def num_mask_head_params(in_channels: int = 8, channels: int = 8, num_layers: int = 3) -> int:
    """Length of one instance's flat parameter vector (153 for the defaults)."""
    weight_nums, bias_nums = mask_head_param_layout(in_channels, channels, num_layers)
    return sum(weight_nums) + sum(bias_nums)


def parse_dynamic_params(
    params: Tensor, in_channels: int = 8, channels: int = 8, num_layers: int = 3
) -> tuple[list[Tensor], list[Tensor]]:
    """Split (M, P) flat params (all weights, then all biases) into weights [(M, out, in)] and biases [(M, out)]."""
    weight_nums, bias_nums = mask_head_param_layout(in_channels, channels, num_layers)
    if params.dim() != 2 or params.shape[1] != sum(weight_nums) + sum(bias_nums):
        expected = sum(weight_nums) + sum(bias_nums)
        raise ValueError(f"expected params of shape (M, {expected}), got {tuple(params.shape)}")
    num_instances = params.shape[0]
    splits = torch.split_with_sizes(params, weight_nums + bias_nums, dim=1)
    weights = [w.reshape(num_instances, b, n // b) for w, n, b in zip(splits[:num_layers], weight_nums, bias_nums)]
    biases = list(splits[num_layers:])
    return weights, biases


def _run_layers(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    """Apply per-instance linear layers to (M, C, L) features, ReLU between layers -> (M, L)."""
    num_layers = len(weights)
    for layer, (w, b) in enumerate(zip(weights, biases)):
        x = torch.baddbmm(b.unsqueeze(-1), w, x)
        if layer < num_layers - 1:
            x = F.relu(x, inplace=True)
    return x.squeeze(1)


def dynamic_mask_logits(
    mask_feats: Tensor,
    params: Tensor,
    image_index: Tensor,
    in_channels: int = 8,
    channels: int = 8,
    num_layers: int = 3,
) -> Tensor:
    """Mask logits (M, H, W): instance m runs params[m] (M, P) as 1x1 convs on mask_feats[image_index[m]] (B,C,H,W)."""
    batch, num_feats, height, width = mask_feats.shape
    if num_feats != in_channels:
        raise ValueError(f"mask_feats has {num_feats} channels, the dynamic head expects {in_channels}")
    weights, biases = parse_dynamic_params(params, in_channels, channels, num_layers)
    num_instances = params.shape[0]
    if num_instances == 0:
        return mask_feats.new_zeros((0, height, width))
    feats = mask_feats.flatten(2)
    first_w, first_b = weights[0], biases[0]
    first_out = first_w.shape[1]
    budget = _CPU_CHUNK_ELEMENTS if mask_feats.device.type == "cpu" else _CHUNK_ELEMENTS
    chunk = max(1, budget // (max(in_channels, channels) * height * width))
    outputs: list[Tensor] = []
    for start in range(0, num_instances, chunk):
        stop = min(start + chunk, num_instances)
        w0 = first_w[start:stop]
        b0 = first_b[start:stop]
        if batch == 1:
            x = torch.addmm(b0.reshape(-1, 1), w0.reshape(-1, in_channels), feats[0])
            x = x.reshape(stop - start, first_out, -1)
        else:
            x = torch.baddbmm(b0.unsqueeze(-1), w0, feats.index_select(0, image_index[start:stop]))
        if num_layers > 1:
            rest_w = [w[start:stop] for w in weights[1:]]
            rest_b = [b[start:stop] for b in biases[1:]]
            x = _run_layers(F.relu(x, inplace=True), rest_w, rest_b)
        else:
            x = x.squeeze(1)
        outputs.append(x)
    logits = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    return logits.reshape(num_instances, height, width)


class DynamicMaskWindows:
    """The dynamic head's mask probabilities of one image, computed on demand on windows of its mask features.

    ``window(m, y0, y1, x0, x1)`` equals ``dynamic_mask_logits(...).sigmoid()[m, y0:y1, x0:x1]``; post-processing
    asks only for the cells inside each kept box, so the head does not run on the whole map for every instance.
    mask_feats (C, h, w), params (M, P); ``shape`` is (M, h, w).
    """

    def __init__(
        self, mask_feats: Tensor, params: Tensor, in_channels: int = 8, channels: int = 8, num_layers: int = 3
    ):
        if mask_feats.dim() != 3 or mask_feats.shape[0] != in_channels:
            raise ValueError(f"expected mask_feats of shape ({in_channels}, h, w), got {tuple(mask_feats.shape)}")
        self.mask_feats = mask_feats
        self.weights, self.biases = parse_dynamic_params(params, in_channels, channels, num_layers)
        self.shape = (params.shape[0], *mask_feats.shape[1:])
        self.dtype, self.device = mask_feats.dtype, mask_feats.device

    def __len__(self) -> int:
        return self.shape[0]

    def window(self, m: int, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        """Probabilities (y1 - y0, x1 - x0) of instance m on cells [y0, y1) x [x0, x1)."""
        x = self.mask_feats[:, y0:y1, x0:x1].reshape(self.mask_feats.shape[0], -1)
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.addmm(b[m, :, None], w[m], x)
            if layer < last:
                x = x.relu_()
        return x.view(y1 - y0, x1 - x0).sigmoid_()
