"""The DiffusionInst meta-architecture: wires backbone, head (mask branch + decoder), diffusion, criterion and
post-processing, each of which reads its own config keys."""
from __future__ import annotations

import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances
from torch import nn

from ..layers import use_cpu_kernels
from .box_ops import box_xyxy_to_cxcywh
from .criterion import SetCriterion
from .diffusion import corrupt_boxes, diffusion_buffers, pad_boxes, q_sample, signal_from_filters
from .dynamic_mask_head import num_mask_head_params
from .head import DiffusionInstHead
from .postprocess import detections_to_instances
from .sampler import DDIMSampler

__all__ = ["DiffusionInst"]

_COMPILED = "_compiled_backbone_module"  # the torch.compile of the backbone (TEST.COMPILE), not a registered module


@META_ARCH_REGISTRY.register()
class DiffusionInst(nn.Module):
    """Instance segmentation by denoising boxes and the instance-aware filters decoded from them.

    Training: ground-truth boxes padded with random boxes are noised at a random step t and refined by the
    decoder, whose filters theta drive the dynamic mask head over F_mask. Inference: boxes start as Gaussian
    noise and are denoised by DDIM (``SAMPLE_STEP`` steps, box renewal, ensemble). With a head built for filter
    denoising the filters are part of the diffusion state too; with one that derives boxes from masks (no box
    losses), boxes are the extents of the masks.
    """

    @configurable
    def __init__(
        self, *, backbone: Backbone, head: DiffusionInstHead, criterion: SetCriterion, sampler: DDIMSampler,
        in_features: Sequence[str], mask_in_features: Sequence[str], num_proposals: int,
        pixel_mean: Sequence[float], pixel_std: Sequence[float], num_timesteps: int = 1000, snr_scale: float = 2.0,
        use_nms: bool = True, nms_thresh: float = 0.5, max_detections: int = 100, mask_threshold: float = 0.5,
        inference_seed: int = -1, inference_dtype: Optional[str] = None, channels_last: bool = False,
        compile_backbone: bool = False, postprocess: str = "auto", cpu_kernels: bool = True,
    ):
        super().__init__()
        for name, tensor in diffusion_buffers(num_timesteps).items():  # the original's state_dict holds them
            self.register_buffer(name, tensor)
        self.backbone, self.head, self.criterion, self.sampler = backbone, head, criterion, sampler
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.in_features, self.mask_in_features = list(in_features), list(mask_in_features)
        self.num_classes, self.num_proposals = criterion.num_classes, num_proposals
        self.num_timesteps, self.scale = num_timesteps, snr_scale
        self.use_nms, self.nms_thresh, self.max_detections = use_nms, nms_thresh, max_detections
        self.mask_head_layout, self.mask_threshold = head.mask_head_layout, mask_threshold
        self.inference_seed = inference_seed
        self.inference_dtype = getattr(torch, inference_dtype) if inference_dtype else None
        self.channels_last, self.compile_backbone = channels_last, compile_backbone
        self.postprocess, self.cpu_kernels = postprocess, cpu_kernels
        self.filter_denoising = head.filter_embed is not None
        self.num_mask_params = num_mask_head_params(*head.mask_head_layout)

    @classmethod
    def from_config(cls, cfg) -> dict:
        d = cfg.MODEL.DiffusionInst
        backbone = build_backbone(cfg)
        head = use_cpu_kernels(DiffusionInstHead(cfg, backbone.output_shape()), d.CPU_KERNELS)
        return {
            "backbone": backbone, "head": head, "criterion": SetCriterion(cfg, mask_stride=head.mask_stride),
            "sampler": DDIMSampler(cfg), "in_features": cfg.MODEL.ROI_HEADS.IN_FEATURES,
            "mask_in_features": d.MASK_IN_FEATURES, "num_proposals": d.NUM_PROPOSALS,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD, "num_timesteps": d.NUM_TIMESTEPS,
            "snr_scale": d.SNR_SCALE, "use_nms": d.USE_NMS, "nms_thresh": d.NMS_THRESH,
            "max_detections": cfg.TEST.DETECTIONS_PER_IMAGE, "mask_threshold": d.MASK_THRESHOLD,
            "inference_seed": d.INFERENCE_SEED, "inference_dtype": cfg.TEST.AMP.DTYPE if cfg.TEST.AMP.ENABLED else None,
            "channels_last": cfg.TEST.CHANNELS_LAST, "compile_backbone": cfg.TEST.COMPILE,
            "postprocess": d.POSTPROCESS, "cpu_kernels": d.CPU_KERNELS,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def batched_postprocess(self) -> bool:
        """Whether post-processing runs in batched ops (POSTPROCESS "batched", or "auto" off the CPU kernels' path:
        any device but the CPU, or CPU_KERNELS False) rather than box by box."""
        if self.postprocess != "auto":
            return self.postprocess == "batched"
        return self.device.type != "cpu" or not self.cpu_kernels

    def preprocess_image(self, batched_inputs: List[Dict]) -> Tuple[ImageList, torch.Tensor]:
        """Normalise and pad images; also returns each image's unpadded (w, h, w, h) as (B, 4) float."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        whwh = torch.tensor([[w, h, w, h] for h, w in images.image_sizes], dtype=torch.float32, device=self.device)
        return images, whwh

    def extract_features(self, images: ImageList) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """RoI-pooling features (the decoder's levels) and F_mask (B, c, H/4, W/4), both contiguous NCHW.

        At inference, ``channels_last`` convolves in channels-last memory format and ``compile_backbone`` runs a
        ``torch.compile`` of the backbone (kept out of the state_dict and of copies).
        """
        x, backbone = images.tensor, self.backbone
        if not self.training:
            x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
            if self.compile_backbone:
                if getattr(self.__dict__.get(_COMPILED), "_orig_mod", None) is not self.backbone:
                    self.__dict__[_COMPILED] = torch.compile(self.backbone)
                backbone = self.__dict__[_COMPILED]
        features = backbone(x)
        mask_feats = self.head.mask_features([features[f] for f in self.mask_in_features])
        return [features[f].contiguous() for f in self.in_features], mask_feats.contiguous()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != _COMPILED}  # copies (EMA) compile their own

    def forward(self, batched_inputs: List[Dict]):
        """Training: dict of losses. Inference: list of {"instances": Instances} at each input's height/width."""
        if not self.training:
            return self.inference(batched_inputs)
        images, whwh = self.preprocess_image(batched_inputs)
        features, mask_feats = self.extract_features(images)
        targets = self.prepare_targets([x["instances"].to(self.device) for x in batched_inputs], whwh)
        boxes, t = self.noisy_boxes(targets, whwh)
        filter_signal = self.noisy_filters(features, mask_feats, boxes, t, whwh) if self.filter_denoising else None
        logits, pred_boxes, filters = self.head(features, boxes, t, filter_signal, mask_feats, whwh)
        return self.criterion(logits, pred_boxes, filters, mask_feats, targets)

    def prepare_targets(self, gt_instances: List[Instances], whwh: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """Per-image dicts of labels, absolute boxes, normalised cx,cy,w,h boxes, image size and masks."""
        all_labels = torch.cat([inst.gt_classes for inst in gt_instances])
        if len(all_labels) and int(all_labels.max()) >= self.num_classes:  # one host sync for the batch
            raise ValueError(f"ground-truth class id {int(all_labels.max())} >= MODEL.DiffusionInst.NUM_CLASSES "
                             f"({self.num_classes}); set NUM_CLASSES to the dataset's number of classes")
        targets = []
        for inst, image_whwh in zip(gt_instances, whwh):
            labels = inst.gt_classes
            h, w = inst.image_size
            masks = inst.gt_masks.tensor if inst.has("gt_masks") else torch.zeros((0, h, w), device=self.device)
            boxes_xyxy = inst.gt_boxes.tensor
            if self.head.boxes_from_masks and inst.has("gt_masks"):  # boxes are the masks' extents, as predicted ones
                from_masks = inst.gt_masks.get_bounding_boxes().tensor.to(boxes_xyxy)
                boxes_xyxy = torch.where(masks.flatten(1).any(1)[:, None], from_masks, boxes_xyxy)
            targets.append({"labels": labels, "boxes_xyxy": boxes_xyxy, "masks": masks, "image_size_xyxy": image_whwh,
                            "boxes": box_xyxy_to_cxcywh(boxes_xyxy / image_whwh)})
        return targets

    def noisy_boxes(self, targets: List[Dict[str, torch.Tensor]], whwh: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pad each image's gt boxes to N, noise them at one random step per image: boxes (B, N, 4) abs, t (B,)."""
        x_start = torch.stack([pad_boxes(t["boxes"], self.num_proposals) for t in targets])
        t = torch.randint(0, self.num_timesteps, (len(targets),), device=self.device, dtype=torch.long)
        noise = torch.randn((len(targets), self.num_proposals, 4), device=self.device)
        boxes = corrupt_boxes(x_start, t, noise, self.scale, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)
        return boxes.float() * whwh[:, None, :], t

    @torch.no_grad()
    def noisy_filters(self, features: List[torch.Tensor], mask_feats: torch.Tensor, boxes: torch.Tensor,
                      t: torch.Tensor, whwh: torch.Tensor) -> torch.Tensor:
        """Filter signal at steps t (B, N, P) for filter denoising: the decoder's own last-stage filters for these
        boxes, decoded from pure filter noise (as at the first sampling step) and detached, noised to step t."""
        noise = torch.randn((boxes.shape[0], self.num_proposals, self.num_mask_params), device=self.device)
        _, _, filters = self.head(features, boxes, t, noise, mask_feats, whwh)
        x_start = signal_from_filters(filters[-1].float(), self.scale, self.head.filter_range)
        x = q_sample(x_start, t, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod, torch.randn_like(x_start))
        return x.to(x_start.dtype)

    @torch.no_grad()
    def inference(
        self, batched_inputs: List[Dict], init_boxes: Optional[torch.Tensor] = None,
        generators: Optional[Sequence[torch.Generator]] = None, do_postprocess: bool = True,
        step_noise: Optional[torch.Tensor] = None,
    ) -> List[Dict[str, Instances]]:
        """Detect and segment a batch of images.

        ``init_boxes`` (B, N, 4): the initial box signal x_T (default: N(0, I)); ``generators``: one
        ``torch.Generator`` per image for all sampling noise. With either, results are reproducible; without
        them, ``inference_seed`` >= 0 seeds each image's generator from its ``image_id`` (else ``file_name``).
        ``step_noise`` (SAMPLE_STEP - 1, 2, B, N, 4) gives the DDIM and renewal noise of the later steps (the ONNX
        graph's input). With filter denoising, the initial filter signal (B, N, P) is drawn after ``init_boxes``.
        Images are batched with the others of the same padded size, so each result equals the one the image
        gets alone: padding a small image up to a larger one's size would change its border features.
        """
        if generators is not None and len(generators) != len(batched_inputs):
            raise ValueError(f"got {len(generators)} generators for {len(batched_inputs)} images")
        if generators is None and self.inference_seed >= 0:
            generators = [self._image_generator(x) for x in batched_inputs]
        shape = (len(batched_inputs), self.num_proposals, 4)
        if init_boxes is None:
            init_boxes = self.sampler.initial_signal(shape, self.device, generators)
        if tuple(init_boxes.shape) != shape:
            raise ValueError(f"init_boxes must have shape {shape}, got {tuple(init_boxes.shape)}")
        x_init = init_boxes.to(self.device)
        if self.filter_denoising:
            filters = self.sampler.initial_signal((*shape[:2], self.num_mask_params), self.device, generators)
            x_init = torch.cat([x_init, filters.to(self.device)], dim=-1)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, x in enumerate(batched_inputs):
            d = max(self.backbone.size_divisibility, 1)
            groups.setdefault(tuple(-(-int(s) // d) * d for s in x["image"].shape[-2:]), []).append(i)
        results: List[Optional[Dict[str, Instances]]] = [None] * len(batched_inputs)
        for idx in groups.values():
            outputs = self._inference_same_size([batched_inputs[i] for i in idx], x_init[idx],
                                                None if generators is None else [generators[i] for i in idx],
                                                do_postprocess, None if step_noise is None else step_noise[:, :, idx])
            for i, out in zip(idx, outputs):
                results[i] = out
        return results

    def _image_generator(self, x: Dict) -> torch.Generator:
        """A generator seeded from INFERENCE_SEED and the image's identity, independent of batch composition."""
        key = x.get("image_id")
        if not isinstance(key, int):
            key = zlib.crc32(str(x.get("file_name", key)).encode())
        return torch.Generator(device=self.device).manual_seed(self.inference_seed * 1_000_003 + key)

    def _inference_same_size(self, batched_inputs, x_init, generators, do_postprocess, step_noise=None):
        """Inference for images that share one padded size: one backbone pass, one batched DDIM loop from x_init."""
        images, whwh = self.preprocess_image(batched_inputs)
        with torch.autocast(self.device.type, dtype=self.inference_dtype or torch.float16,
                            enabled=self.inference_dtype is not None):
            features, mask_feats = self.extract_features(images)

            def decode(boxes: torch.Tensor, filter_signal: Optional[torch.Tensor], t: torch.Tensor):
                logits, pred_boxes, filters = self.head(features, boxes, t, filter_signal, mask_feats, whwh)
                return logits[-1].float(), pred_boxes[-1].float(), filters[-1].float()

            steps = self.sampler.sample(decode, whwh, x_init, generators, step_noise)
        mask_feats = mask_feats.float()
        batched = self.batched_postprocess
        processed = []
        for b, (x, size) in enumerate(zip(batched_inputs, images.image_sizes)):
            out_size = (x.get("height", size[0]), x.get("width", size[1])) if do_postprocess else size
            image_steps = [(logits[b], boxes[b], filters[b]) for logits, boxes, filters in steps]
            processed.append({"instances": detections_to_instances(
                image_steps, mask_feats[b], size, out_size, num_proposals=self.num_proposals,
                nms_thresh=self.nms_thresh, use_nms=self.use_nms, max_detections=self.max_detections,
                mask_head_layout=self.mask_head_layout, mask_threshold=self.mask_threshold, batched=batched)})
        return processed
