"""DDIM sampling of boxes with box renewal and the multi-step ensemble (DiffusionDet's inference)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .diffusion import boxes_from_signal, ddim_step, ddim_time_pairs, predict_noise_from_start, signal_from_boxes

__all__ = ["DDIMSampler", "StepOutput"]

StepOutput = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Last-stage outputs of one step: class logits (B, N, K), boxes (B, N, 4) abs xyxy, filters (B, N, P)."""

DecodeFn = Callable[[torch.Tensor, torch.Tensor], StepOutput]


class DDIMSampler:
    """Runs the decoder from Gaussian boxes to predictions over ``sample_steps`` DDIM steps.

    With more than one step, the predictions of every step are returned for ensembling (the original release
    leaves out the last step, DiffusionDet issue #56; ``ensemble_last_step=False`` restores that).
    """

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
    ):
        if not 1 <= sample_steps <= num_timesteps:
            raise ValueError(f"MODEL.DiffusionInst.SAMPLE_STEP must be in [1, {num_timesteps}], got {sample_steps}")
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_recip_alphas_cumprod = sqrt_recip_alphas_cumprod
        self.sqrt_recipm1_alphas_cumprod = sqrt_recipm1_alphas_cumprod
        self.time_pairs = ddim_time_pairs(num_timesteps, sample_steps)
        self.eta = eta
        self.scale = scale
        self.box_renewal = box_renewal
        self.renewal_threshold = renewal_threshold
        self.ensemble = use_ensemble and sample_steps > 1
        self.ensemble_last_step = ensemble_last_step

    @staticmethod
    def _randn(shape: Tuple[int, ...], generators: Optional[Sequence[torch.Generator]], like: torch.Tensor) -> torch.Tensor:
        """(B, *shape[1:]) normal noise; with generators, image b's rows come from generators[b] only."""
        if generators is None:
            return torch.randn(shape, device=like.device, dtype=torch.float32)
        return torch.stack(
            [torch.randn(shape[1:], generator=g, device=g.device).to(like.device) for g in generators]
        )

    def initial_boxes(
        self, batch: int, num_proposals: int, device: torch.device, generators: Optional[Sequence[torch.Generator]]
    ) -> torch.Tensor:
        """Box signal x_T ~ N(0, I) of shape (B, N, 4)."""
        return self._randn((batch, num_proposals, 4), generators, torch.empty(0, device=device))

    @torch.no_grad()
    def sample(
        self,
        decode: DecodeFn,
        images_whwh: torch.Tensor,
        x: torch.Tensor,
        generators: Optional[Sequence[torch.Generator]] = None,
    ) -> List[StepOutput]:
        """Denoise the box signal x (B, N, 4); returns the step outputs whose predictions form the result.

        ``decode(boxes_abs_xyxy (B, N, 4), t (B,))`` runs the decoder. ``generators`` (one per image) make the
        renewal and DDIM noise of each image independent of the batch it is in.
        """
        batch, num_proposals = x.shape[:2]
        whwh = images_whwh[:, None, :]
        outputs: List[StepOutput] = []
        for t, t_next in self.time_pairs:
            time = torch.full((batch,), t, device=x.device, dtype=torch.long)
            boxes_in = (boxes_from_signal(x, self.scale) * whwh).to(images_whwh.dtype)
            logits, boxes, filters = decode(boxes_in, time)
            last = t_next < 0
            if self._contributes(last):
                outputs.append((logits, boxes, filters))
            if last:
                break
            x_start = signal_from_boxes(boxes / whwh, self.scale)
            pred_noise = predict_noise_from_start(
                x, time, x_start, self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod
            )
            x = self._next_signal(x, x_start, pred_noise, logits, t, t_next, generators)
        return outputs

    def _contributes(self, last: bool) -> bool:
        """Whether a step's predictions go into the result: the last one, or every one when ensembling."""
        if not self.ensemble:
            return last
        return self.ensemble_last_step or not last

    def _next_signal(self, x, x_start, pred_noise, logits, t: int, t_next: int, generators) -> torch.Tensor:
        """DDIM update of the kept boxes, followed (with box renewal) by fresh noise for the dropped ones.

        As in the original, the DDIM noise has the dtype of the current signal x and the refill is float32.
        """
        batch, num_proposals = x_start.shape[:2]
        alpha, alpha_next = self.alphas_cumprod[t], self.alphas_cumprod[t_next]
        if self.box_renewal:
            keep = logits.sigmoid().amax(-1) > self.renewal_threshold
        else:
            keep = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        # Kept boxes first, in their original order; the rest is refilled.
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        x_start = torch.gather(x_start, 1, order[..., None].expand(-1, -1, 4))
        pred_noise = torch.gather(pred_noise, 1, order[..., None].expand(-1, -1, 4))
        num_keep = keep.sum(1)
        if generators is None:
            noise = torch.randn(x_start.shape, dtype=x.dtype, device=x.device)
            refill = torch.randn(x_start.shape, dtype=torch.float32, device=x.device)
        else:
            noise = torch.zeros(x_start.shape, dtype=x.dtype, device=x.device)
            refill = torch.zeros(x_start.shape, dtype=torch.float32, device=x.device)
            for b, g in enumerate(generators):
                k = int(num_keep[b])
                noise[b, :k] = torch.randn((k, 4), generator=g, dtype=x.dtype, device=g.device).to(x.device)
                refill[b, k:] = torch.randn((num_proposals - k, 4), generator=g, device=g.device).to(x.device)
        x_next = ddim_step(x_start, pred_noise, alpha, alpha_next, self.eta, noise)
        is_kept = torch.arange(num_proposals, device=x_next.device)[None, :] < num_keep[:, None]
        return torch.where(is_kept[..., None], x_next, refill.to(x_next.dtype))
