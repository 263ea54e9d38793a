"""Gaussian diffusion of box (and, optionally, filter) signals: cosine schedule, forward corruption, DDIM updates."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = [
    "cosine_beta_schedule",
    "diffusion_buffers",
    "extract",
    "q_sample",
    "predict_noise_from_start",
    "ddim_time_pairs",
    "ddim_step",
    "pad_boxes",
    "corrupt_boxes",
    "boxes_from_signal",
    "signal_from_boxes",
    "signal_from_filters",
]


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> Tensor:
    """Cosine noise schedule (Nichol & Dhariwal) -> betas (timesteps,) float64, clipped to [0, 0.999]."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, 0.999)


def diffusion_buffers(timesteps: int = 1000, s: float = 0.008) -> dict[str, Tensor]:
    """All (timesteps,) float64 schedule tensors, keyed and ordered as the checkpoint buffers of the original model."""
    betas = cosine_beta_schedule(timesteps, s)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": torch.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
    }


def extract(a: Tensor, t: Tensor, x_shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Gather a (T,) schedule at long timesteps t (B,) -> (B, 1, ..., 1) broadcastable against x_shape."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def q_sample(
    x_start: Tensor,
    t: Tensor,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
    noise: Tensor,
) -> Tensor:
    """Forward diffusion sqrt(ac_t) x_0 + sqrt(1 - ac_t) noise; x_start (B, N, 4) with t (B,), or (N, 4) with t (1,)."""
    return (
        extract(sqrt_alphas_cumprod, t, x_start.shape) * x_start
        + extract(sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
    )


def predict_noise_from_start(
    x_t: Tensor,
    t: Tensor,
    x0: Tensor,
    sqrt_recip_alphas_cumprod: Tensor,
    sqrt_recipm1_alphas_cumprod: Tensor,
) -> Tensor:
    """Noise implied by x_t (B, N, 4) and a predicted x_0 (B, N, 4) at timesteps t (B,) -> (B, N, 4)."""
    return (extract(sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
        sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )


def ddim_time_pairs(total_timesteps: int, sampling_steps: int) -> list[tuple[int, int]]:
    """(time, time_next) pairs of DDIM sampling, from T-1 down to -1, e.g. (1000, 1) -> [(999, -1)]."""
    times = torch.linspace(-1, total_timesteps - 1, steps=sampling_steps + 1)
    times = list(reversed(times.int().tolist()))
    return list(zip(times[:-1], times[1:]))


def ddim_step(
    x_start: Tensor,
    pred_noise: Tensor,
    alpha: Tensor,
    alpha_next: Tensor,
    eta: float,
    noise: Tensor,
) -> Tensor:
    """One DDIM update from predicted x_0 and noise (B, N, 4); alpha, alpha_next are 0-dim alphas_cumprod entries."""
    sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
    c = (1 - alpha_next - sigma**2).sqrt()
    return x_start * alpha_next.sqrt() + c * pred_noise + sigma * noise


def pad_boxes(gt_boxes: Tensor, num_proposals: int, generator: torch.Generator | None = None) -> Tensor:
    """Pad (or subsample) normalised cxcywh gt boxes (G, 4) to exactly (num_proposals, 4) diffusion starting points."""
    num_gt = gt_boxes.shape[0]
    if num_gt == 0:
        gt_boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0]], dtype=gt_boxes.dtype, device=gt_boxes.device)
        num_gt = 1
    if num_gt < num_proposals:
        placeholder = (
            torch.randn(
                num_proposals - num_gt, 4, generator=generator, dtype=gt_boxes.dtype, device=gt_boxes.device
            )
            / 6.0
            + 0.5
        )
        placeholder[:, 2:] = torch.clip(placeholder[:, 2:], min=1e-4)
        return torch.cat((gt_boxes, placeholder), dim=0)
    if num_gt > num_proposals:
        keep = torch.randperm(num_gt, generator=generator, device=gt_boxes.device)[:num_proposals]
        return gt_boxes[keep.sort().values]
    return gt_boxes


def corrupt_boxes(
    x_start: Tensor,
    t: Tensor,
    noise: Tensor,
    scale: float,
    sqrt_alphas_cumprod: Tensor,
    sqrt_one_minus_alphas_cumprod: Tensor,
) -> Tensor:
    """Diffuse normalised cxcywh boxes (B, N, 4) to timesteps t (B,) -> normalised xyxy (B, N, 4) in x_start's dtype."""
    x0 = (x_start * 2.0 - 1.0) * scale
    x = q_sample(x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, noise)
    return boxes_from_signal(x, scale).to(x_start.dtype)


def boxes_from_signal(x: Tensor, scale: float) -> Tensor:
    """Map a diffusion signal (B, N, 4) in [-scale, scale] cxcywh to normalised xyxy boxes (B, N, 4)."""
    x = torch.clamp(x, min=-1 * scale, max=scale)
    x = ((x / scale) + 1) / 2.0
    return box_cxcywh_to_xyxy(x)


def signal_from_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Map normalised xyxy boxes (B, N, 4) to the clamped diffusion signal (B, N, 4) in [-scale, scale] cxcywh."""
    x = box_xyxy_to_cxcywh(boxes)
    x = (x * 2 - 1.0) * scale
    return torch.clamp(x, min=-1 * scale, max=scale)


def signal_from_filters(filters: Tensor, scale: float, filter_range: float) -> Tensor:
    """Map instance filters theta (B, N, P), clamped to [-filter_range, filter_range], to a signal in [-scale, scale]."""
    return torch.clamp(filters / filter_range, min=-1.0, max=1.0) * scale

