"""DDIM sampling of boxes (and, with filter denoising, filters) with box renewal and the multi-step ensemble."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import nn

from .diffusion import (
    boxes_from_signal,
    ddim_step,
    diffusion_buffers,
    ddim_time_pairs,
    predict_noise_from_start,
    signal_from_boxes,
    signal_from_filters,
)

__all__ = ["DDIMSampler", "SamplerStep", "StepObserver", "StepOutput"]

StepOutput = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Last-stage outputs of one step: class logits (B, N, K), boxes (B, N, 4) abs xyxy, filters (B, N, P)."""

DecodeFn = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor], StepOutput]


@dataclass
class SamplerStep:
    """What one DDIM step of :meth:`DDIMSampler.sample` saw and did, for each image of the batch (B images).

    ``boxes_in`` (B, N, 4): the boxes going into the decoder (x_t, abs xyxy); ``logits`` (B, N, K) and ``boxes``
    (B, N, 4): its last stage's predictions; ``keep`` (B, N): the proposals whose DDIM update is kept (False: box
    renewal replaces them with fresh noise); ``order`` (B, N): row i of the next step's signal comes from this step's
    proposal ``order[b, i]`` (kept first; the renewed rows hold new noise). ``keep`` and ``order`` are None on the
    last step (``t_next`` -1), which renews nothing.
    """

    step: int
    t: int
    t_next: int
    images_whwh: torch.Tensor
    boxes_in: torch.Tensor
    logits: torch.Tensor
    boxes: torch.Tensor
    keep: Optional[torch.Tensor]
    order: Optional[torch.Tensor]


StepObserver = Callable[[SamplerStep], None]


class DDIMSampler(nn.Module):
    """Runs the decoder from Gaussian boxes to predictions over ``sample_steps`` DDIM steps.

    With more than one step, the predictions of every step are returned for ensembling (the original release
    leaves out the last step, DiffusionDet issue #56; ``ensemble_last_step=False`` restores that). With
    ``filter_range`` set (filter denoising), the state holds each proposal's filter signal after its 4 box values,
    and filters go through the same DDIM updates and renewal as boxes. The schedule tensors are non-persistent
    buffers, so they follow the model to its device and stay out of its state dict.
    """

    @configurable
    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        sqrt_recip_alphas_cumprod: torch.Tensor,
        sqrt_recipm1_alphas_cumprod: torch.Tensor,
        num_timesteps: int = 1000,
        sample_steps: int = 1,
        eta: float = 1.0,
        scale: float = 2.0,
        box_renewal: bool = True,
        renewal_threshold: float = 0.5,
        use_ensemble: bool = True,
        ensemble_last_step: bool = True,
        filter_range: Optional[float] = None,
    ):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone(), persistent=False)
        self.register_buffer("sqrt_recip_alphas_cumprod", sqrt_recip_alphas_cumprod.clone(), persistent=False)
        self.register_buffer("sqrt_recipm1_alphas_cumprod", sqrt_recipm1_alphas_cumprod.clone(), persistent=False)
        self.time_pairs = ddim_time_pairs(num_timesteps, sample_steps)
        self.eta = eta
        self.scale = scale
        self.box_renewal = box_renewal
        self.renewal_threshold = renewal_threshold
        self.ensemble = use_ensemble and sample_steps > 1
        self.ensemble_last_step = ensemble_last_step
        self.filter_range = filter_range
        self._observer: Optional[StepObserver] = None

    @classmethod
    def from_config(cls, cfg) -> dict:
        d = cfg.MODEL.DiffusionInst
        schedule = diffusion_buffers(d.NUM_TIMESTEPS)
        return {
            "alphas_cumprod": schedule["alphas_cumprod"],
            "sqrt_recip_alphas_cumprod": schedule["sqrt_recip_alphas_cumprod"],
            "sqrt_recipm1_alphas_cumprod": schedule["sqrt_recipm1_alphas_cumprod"],
            "num_timesteps": d.NUM_TIMESTEPS, "sample_steps": d.SAMPLE_STEP, "eta": d.DDIM_ETA, "scale": d.SNR_SCALE,
            "box_renewal": d.BOX_RENEWAL, "renewal_threshold": d.RENEWAL_THRESHOLD, "use_ensemble": d.USE_ENSEMBLE,
            "ensemble_last_step": d.ENSEMBLE_LAST_STEP,
            "filter_range": d.FILTER_SIGNAL_RANGE if d.FILTER_DENOISING else None,
        }

    @staticmethod
    def _randn(shape: Tuple[int, ...], generators: Optional[Sequence[torch.Generator]], like: torch.Tensor) -> torch.Tensor:
        """(B, *shape[1:]) normal noise; with generators, image b's rows come from generators[b] only."""
        if generators is None:
            return torch.randn(shape, device=like.device, dtype=torch.float32)
        return torch.stack(
            [torch.randn(shape[1:], generator=g, device=g.device).to(like.device) for g in generators]
        )

    def initial_signal(
        self, shape: Tuple[int, ...], device: torch.device, generators: Optional[Sequence[torch.Generator]]
    ) -> torch.Tensor:
        """x_T ~ N(0, I) of ``shape`` (B, N, D): D = 4 for the box signal, P for the filter signal."""
        return self._randn(shape, generators, torch.empty(0, device=device))

    @contextmanager
    def observe(self, observer: StepObserver) -> Iterator[None]:
        """Within the block, every step of :meth:`sample` (hence of ``model.inference``) is passed to ``observer`` as a
        :class:`SamplerStep`, after its decoder call; the sampling itself is unchanged. ``model.inference`` samples images
        of different padded sizes in separate loops, each observed on its own."""
        previous, self._observer = self._observer, observer
        try:
            yield
        finally:
            self._observer = previous

    @torch.no_grad()
    def sample(
        self,
        decode: DecodeFn,
        images_whwh: torch.Tensor,
        x: torch.Tensor,
        generators: Optional[Sequence[torch.Generator]] = None,
        step_noise: Optional[torch.Tensor] = None,
    ) -> List[StepOutput]:
        """Denoise the signal x (B, N, D); returns the step outputs whose predictions form the result.

        D is 4 (the box signal), or 4 + P with filter denoising (box signal, then filter signal).
        ``decode(boxes_abs_xyxy (B, N, 4), filter_signal (B, N, P) or None, t (B,))`` runs the decoder.
        ``generators`` (one per image) make the renewal and DDIM noise of each image independent of its batch;
        ``step_noise`` (steps - 1, 2, B, N, D) gives that noise instead: after step s, the DDIM noise of the kept
        proposals is ``step_noise[s, 0]`` and the renewed ones' is ``step_noise[s, 1]`` (rows in kept-first order).
        """
        batch = x.shape[0]
        whwh = images_whwh[:, None, :]
        outputs: List[StepOutput] = []
        for step, (t, t_next) in enumerate(self.time_pairs):
            time = torch.full((batch,), t, device=x.device, dtype=torch.long)
            boxes_in = (boxes_from_signal(x[..., :4], self.scale) * whwh).to(images_whwh.dtype)
            filters_in = x[..., 4:] if self.filter_range is not None else None
            logits, boxes, filters = decode(boxes_in, filters_in, time)
            last = t_next < 0
            if self._contributes(last):
                outputs.append((logits, boxes, filters))
            if last:
                self._notify(step, t, t_next, images_whwh, boxes_in, logits, boxes, None, None)
                break
            x_start = signal_from_boxes(boxes / whwh, self.scale)
            if self.filter_range is not None:
                x_start = torch.cat([x_start, signal_from_filters(filters, self.scale, self.filter_range).to(x_start)], -1)
            pred_noise = predict_noise_from_start(
                x, time, x_start, self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod
            )
            noise = None if step_noise is None else step_noise[step]
            keep = self._keep(logits)
            x, order = self._next_signal(x, x_start, pred_noise, keep, t, t_next, generators, noise)
            self._notify(step, t, t_next, images_whwh, boxes_in, logits, boxes, keep, order)
        return outputs

    def _notify(self, step: int, t: int, t_next: int, images_whwh, boxes_in, logits, boxes, keep, order) -> None:
        """Pass one step to the observer of :meth:`observe`, if any."""
        if self._observer is not None:
            self._observer(SamplerStep(step, t, t_next, images_whwh, boxes_in, logits, boxes, keep, order))

    def _keep(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: the proposals box renewal keeps (best class score above the threshold; all without renewal)."""
        if self.box_renewal:
            return logits.sigmoid().amax(-1) > self.renewal_threshold
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)

    def _contributes(self, last: bool) -> bool:
        """Whether a step's predictions go into the result: the last one, or every one when ensembling."""
        if not self.ensemble:
            return last
        return self.ensemble_last_step or not last

    def _next_signal(self, x, x_start, pred_noise, keep: torch.Tensor, t: int, t_next: int, generators,
                     noise_pair: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """DDIM update of the kept proposals' signals (B, N, D), then fresh noise for the others (``keep`` False).

        Returns the next signal and its row order (B, N) (kept proposals first, see :class:`SamplerStep`). As in the
        original, the DDIM noise has the dtype of the current signal x and the refill is float32; with ``noise_pair``
        (2, B, N, D) both come from it (static shapes: what the ONNX export traces).
        """
        batch, num_proposals, dim = x_start.shape
        alpha, alpha_next = self.alphas_cumprod[t], self.alphas_cumprod[t_next]
        # Kept proposals first, in their original order (distinct keys: the same order as a stable sort); the rest
        # is refilled.
        index = torch.arange(num_proposals, device=keep.device)
        order = torch.argsort((~keep).long() * num_proposals + index, dim=1)
        x_start = torch.gather(x_start, 1, order[..., None].expand(-1, -1, dim))
        pred_noise = torch.gather(pred_noise, 1, order[..., None].expand(-1, -1, dim))
        num_keep = keep.sum(1)
        if noise_pair is not None:
            noise, refill = noise_pair[0].to(x.dtype), noise_pair[1].float()
        elif generators is None:
            noise = torch.randn(x_start.shape, dtype=x.dtype, device=x.device)
            refill = torch.randn(x_start.shape, dtype=torch.float32, device=x.device)
        else:
            noise = torch.zeros(x_start.shape, dtype=x.dtype, device=x.device)
            refill = torch.zeros(x_start.shape, dtype=torch.float32, device=x.device)
            for b, g in enumerate(generators):
                k = int(num_keep[b])
                noise[b, :k] = torch.randn((k, dim), generator=g, dtype=x.dtype, device=g.device).to(x.device)
                refill[b, k:] = torch.randn((num_proposals - k, dim), generator=g, device=g.device).to(x.device)
        x_next = ddim_step(x_start, pred_noise, alpha, alpha_next, self.eta, noise)
        is_kept = torch.arange(num_proposals, device=x_next.device)[None, :] < num_keep[:, None]
        return torch.where(is_kept[..., None], x_next, refill.to(x_next.dtype)), order
