"""The DiffusionInst meta-architecture: wires backbone, mask branch, decoder, diffusion, criterion, post-processing."""
from __future__ import annotations

import zlib
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from ..data.datasets import class_image_count
from .box_ops import box_xyxy_to_cxcywh
from .criterion import SetCriterion
from .diffusion import corrupt_boxes, diffusion_buffers, pad_boxes, q_sample, signal_from_filters
from .dynamic_mask_head import DynamicMaskWindows, num_mask_head_params
from .head import DecoderStage, DiffusionInstHead
from .linear import set_onednn_linear
from .losses import fed_loss_class_weights
from .matcher import DynamicKMatcher
from .roi_align import use_fast_roi_align_backward
from .postprocess import masks_to_image, nms_and_cap, select_topk
from .sampler import DDIMSampler

__all__ = ["DiffusionInst"]


def _fed_loss_weights(train_set: Optional[str], num_classes: int, power: float) -> torch.Tensor:
    """The federated loss's class weights (K,) from the image counts of the training set's classes."""
    if train_set is None:
        raise ValueError("MODEL.DiffusionInst.USE_FED_LOSS needs a training set (DATASETS.TRAIN) to count classes")
    return fed_loss_class_weights(class_image_count(train_set, num_classes), power)


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
        self,
        *,
        backbone: Backbone,
        head: DiffusionInstHead,
        criterion: SetCriterion,
        in_features: Sequence[str],
        mask_in_features: Sequence[str],
        num_classes: int,
        num_proposals: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        num_timesteps: int = 1000,
        snr_scale: float = 2.0,
        sample_step: int = 1,
        ddim_eta: float = 1.0,
        box_renewal: bool = True,
        renewal_threshold: float = 0.5,
        use_ensemble: bool = True,
        ensemble_last_step: bool = True,
        use_nms: bool = True,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
        mask_head_layout: Tuple[int, int, int] = (8, 8, 3),
        mask_threshold: float = 0.5,
        inference_seed: int = -1,
        inference_dtype: Optional[str] = None,
        channels_last: bool = False,
        compile_backbone: bool = False,
    ):
        super().__init__()
        if num_proposals < 1:
            raise ValueError(f"MODEL.DiffusionInst.NUM_PROPOSALS must be >= 1, got {num_proposals}")
        for name, tensor in diffusion_buffers(num_timesteps).items():
            self.register_buffer(name, tensor)
        self.backbone = backbone
        self.head = head
        self.criterion = criterion
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.in_features = list(in_features)
        self.mask_in_features = list(mask_in_features)
        self.num_classes = num_classes
        self.num_proposals = num_proposals
        self.num_timesteps = num_timesteps
        self.scale = snr_scale
        self.sampler = DDIMSampler(
            self.alphas_cumprod, self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod,
            num_timesteps=num_timesteps, sample_steps=sample_step, eta=ddim_eta, scale=snr_scale,
            box_renewal=box_renewal, renewal_threshold=renewal_threshold,
            use_ensemble=use_ensemble, ensemble_last_step=ensemble_last_step,
            filter_range=head.filter_range if head.filter_embed is not None else None,
        )
        self.use_nms = use_nms
        self.nms_thresh = nms_thresh
        self.max_detections = max_detections
        self.mask_head_layout = mask_head_layout
        self.mask_threshold = mask_threshold
        self.inference_seed = inference_seed
        self.filter_denoising = head.filter_embed is not None
        self.inference_dtype = getattr(torch, inference_dtype) if inference_dtype else None
        self.channels_last = channels_last
        self.compile_backbone = compile_backbone
        self.num_mask_params = num_mask_head_params(*mask_head_layout)

    @classmethod
    def from_config(cls, cfg) -> dict:
        d = cfg.MODEL.DiffusionInst
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        for key, names in (("MODEL.ROI_HEADS.IN_FEATURES", in_features), ("MODEL.DiffusionInst.MASK_IN_FEATURES", d.MASK_IN_FEATURES)):
            missing = [f for f in names if f not in shapes]
            if missing:
                raise ValueError(f"{key} names {missing}, which the backbone does not output (it has {sorted(shapes)})")
        channels = {shapes[f].channels for f in in_features}
        if channels != {d.HIDDEN_DIM}:
            raise ValueError(
                f"MODEL.DiffusionInst.HIDDEN_DIM ({d.HIDDEN_DIM}) must equal the channels of "
                f"MODEL.ROI_HEADS.IN_FEATURES {in_features}: {sorted(channels)}"
            )
        box_pooler = ROIPooler(
            output_size=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
            scales=tuple(1.0 / shapes[f].stride for f in in_features),
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        )
        use_fast_roi_align_backward(box_pooler)
        mask_layout = (d.MASK_DIM, d.MASK_HEAD_CHANNELS, d.MASK_HEAD_LAYERS)
        mask_stride = shapes[d.MASK_IN_FEATURES[0]].stride
        stage = DecoderStage(
            d_model=d.HIDDEN_DIM,
            num_classes=d.NUM_CLASSES,
            num_mask_params=num_mask_head_params(*mask_layout),
            dim_feedforward=d.DIM_FEEDFORWARD,
            nhead=d.NHEADS,
            dropout=d.DROPOUT,
            activation=d.ACTIVATION,
            num_cls=d.NUM_CLS,
            num_reg=d.NUM_REG,
            dim_dynamic=d.DIM_DYNAMIC,
            num_dynamic=d.NUM_DYNAMIC,
            pooler_resolution=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
        )
        head = DiffusionInstHead(
            stage,
            num_stages=d.NUM_HEADS,
            box_pooler=box_pooler,
            hidden_dim=d.HIDDEN_DIM,
            num_mask_levels=len(d.MASK_IN_FEATURES),
            mask_branch_channels=d.MASK_BRANCH_CHANNELS,
            mask_branch_num_convs=d.MASK_BRANCH_NUM_CONVS,
            mask_dim=d.MASK_DIM,
            deep_supervision=d.DEEP_SUPERVISION,
            prior_prob=d.PRIOR_PROB,
            filter_denoising=d.FILTER_DENOISING,
            boxes_from_masks=not d.USE_BOX_LOSS,
            snr_scale=d.SNR_SCALE,
            filter_range=d.FILTER_SIGNAL_RANGE,
            mask_head_layout=mask_layout,
            mask_stride=mask_stride,
            mask_box_search_scale=d.MASK_BOX_SEARCH_SCALE,
        )
        set_onednn_linear(head, d.ONEDNN_LINEAR)
        matcher = DynamicKMatcher(
            cost_class=d.CLASS_WEIGHT, cost_bbox=d.L1_WEIGHT, cost_giou=d.GIOU_WEIGHT, ota_k=d.OTA_K,
            use_focal=d.USE_FOCAL, use_fed_loss=d.USE_FED_LOSS, focal_alpha=d.ALPHA, focal_gamma=d.GAMMA,
            center_radius=d.CENTER_RADIUS,
        )
        fed_weights = None
        if d.USE_FED_LOSS:  # class image counts of the training set, read at the first training iteration
            train_set, power = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None, d.FED_LOSS_FREQ_WEIGHT_POWER
            fed_weights = partial(_fed_loss_weights, train_set, d.NUM_CLASSES, power)
        criterion = SetCriterion(
            num_classes=d.NUM_CLASSES, matcher=matcher, class_weight=d.CLASS_WEIGHT, l1_weight=d.L1_WEIGHT,
            giou_weight=d.GIOU_WEIGHT, mask_weight=d.MASK_WEIGHT, focal_alpha=d.ALPHA, focal_gamma=d.GAMMA,
            use_focal=d.USE_FOCAL, use_fed_loss=d.USE_FED_LOSS, fed_loss_class_weights=fed_weights,
            fed_loss_num_classes=d.FED_LOSS_NUM_CLASSES, mask_deep_supervision=d.MASK_DEEP_SUPERVISION,
            mask_head_layout=mask_layout, mask_stride=mask_stride, use_box_loss=d.USE_BOX_LOSS,
        )
        return {
            "backbone": backbone,
            "head": head,
            "criterion": criterion,
            "in_features": in_features,
            "mask_in_features": list(d.MASK_IN_FEATURES),
            "num_classes": d.NUM_CLASSES,
            "num_proposals": d.NUM_PROPOSALS,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_timesteps": d.NUM_TIMESTEPS,
            "snr_scale": d.SNR_SCALE,
            "sample_step": d.SAMPLE_STEP,
            "ddim_eta": d.DDIM_ETA,
            "box_renewal": d.BOX_RENEWAL,
            "renewal_threshold": d.RENEWAL_THRESHOLD,
            "use_ensemble": d.USE_ENSEMBLE,
            "ensemble_last_step": d.ENSEMBLE_LAST_STEP,
            "use_nms": d.USE_NMS,
            "nms_thresh": d.NMS_THRESH,
            "max_detections": cfg.TEST.DETECTIONS_PER_IMAGE,
            "mask_head_layout": mask_layout,
            "mask_threshold": d.MASK_THRESHOLD,
            "inference_seed": d.INFERENCE_SEED,
            "inference_dtype": cfg.TEST.AMP.DTYPE if cfg.TEST.AMP.ENABLED else None,
            "channels_last": cfg.TEST.CHANNELS_LAST,
            "compile_backbone": cfg.TEST.COMPILE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> Tuple[ImageList, torch.Tensor]:
        """Normalise and pad images; also returns each image's unpadded (w, h, w, h) as (B, 4) float."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        whwh = torch.tensor([[w, h, w, h] for h, w in images.image_sizes], dtype=torch.float32, device=self.device)
        return images, whwh

    def extract_features(self, images: ImageList) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """RoI-pooling features (the decoder's levels) and F_mask (B, c, H/4, W/4), both contiguous NCHW.

        At inference with ``channels_last`` the backbone and mask branch convolve in channels-last memory format
        (faster CPU kernels); their outputs are made contiguous once here, as RoIAlign would copy them per call.
        """
        x = images.tensor
        backbone = self.backbone
        if not self.training:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.compile_backbone:
                backbone = self._compiled_backbone()
        features = backbone(x)
        mask_feats = self.head.mask_features([features[f] for f in self.mask_in_features])
        return [features[f].contiguous() for f in self.in_features], mask_feats.contiguous()

    def _compiled_backbone(self) -> nn.Module:
        """``torch.compile`` of the backbone for inference (TEST.COMPILE), built on first use. Kept out of the
        registered submodules, so state_dict and checkpoints are unchanged; it runs the backbone's own parameters."""
        compiled = self.__dict__.get("_compiled_backbone_module")
        if compiled is None or compiled._orig_mod is not self.backbone:
            compiled = torch.compile(self.backbone)
            self.__dict__["_compiled_backbone_module"] = compiled
        return compiled

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_compiled_backbone_module", None)  # copies (EMA, pickling) compile their own
        return state

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
        targets = []
        for inst, image_whwh in zip(gt_instances, whwh):
            labels = inst.gt_classes
            if len(labels) and int(labels.max()) >= self.num_classes:
                raise ValueError(
                    f"ground-truth class id {int(labels.max())} >= MODEL.DiffusionInst.NUM_CLASSES "
                    f"({self.num_classes}); set NUM_CLASSES to the dataset's number of classes"
                )
            h, w = inst.image_size
            masks = inst.gt_masks.tensor if inst.has("gt_masks") else torch.zeros((0, h, w), device=self.device)
            boxes_xyxy = inst.gt_boxes.tensor
            if self.head.boxes_from_masks and inst.has("gt_masks"):  # boxes are the masks' extents, as predicted ones
                from_masks = inst.gt_masks.get_bounding_boxes().tensor.to(boxes_xyxy)
                boxes_xyxy = torch.where(masks.flatten(1).any(1)[:, None], from_masks, boxes_xyxy)
            targets.append({
                "labels": labels,
                "boxes_xyxy": boxes_xyxy,
                "boxes": box_xyxy_to_cxcywh(boxes_xyxy / image_whwh),
                "image_size_xyxy": image_whwh,
                "masks": masks,
            })
        return targets

    def noisy_boxes(self, targets: List[Dict[str, torch.Tensor]], whwh: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pad each image's gt boxes to N, noise them at one random step per image: boxes (B, N, 4) abs, t (B,)."""
        x_start = torch.stack([pad_boxes(t["boxes"], self.num_proposals) for t in targets])
        batch = len(targets)
        t = torch.randint(0, self.num_timesteps, (batch,), device=self.device, dtype=torch.long)
        noise = torch.randn((batch, self.num_proposals, 4), device=self.device)
        boxes = corrupt_boxes(x_start, t, noise, self.scale, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)
        return boxes.float() * whwh[:, None, :], t

    @torch.no_grad()
    def noisy_filters(
        self, features: List[torch.Tensor], mask_feats: torch.Tensor, boxes: torch.Tensor, t: torch.Tensor,
        whwh: torch.Tensor,
    ) -> torch.Tensor:
        """Filter signal at steps t (B, N, P) for filter denoising: the decoder's own last-stage filters for these
        boxes, decoded from pure filter noise (as at the first sampling step) and detached, noised to step t."""
        batch = boxes.shape[0]
        noise = torch.randn((batch, self.num_proposals, self.num_mask_params), device=self.device)
        _, _, filters = self.head(features, boxes, t, noise, mask_feats, whwh)
        x_start = signal_from_filters(filters[-1].float(), self.scale, self.head.filter_range)
        x = q_sample(x_start, t, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod, torch.randn_like(x_start))
        return x.to(x_start.dtype)

    @torch.no_grad()
    def inference(
        self,
        batched_inputs: List[Dict],
        init_boxes: Optional[torch.Tensor] = None,
        generators: Optional[Sequence[torch.Generator]] = None,
        do_postprocess: bool = True,
    ) -> List[Dict[str, Instances]]:
        """Detect and segment a batch of images.

        ``init_boxes`` (B, N, 4): the initial box signal x_T (default: N(0, I)); ``generators``: one
        ``torch.Generator`` per image for all sampling noise. With either, results are reproducible; without
        them, ``inference_seed`` >= 0 seeds each image's generator from its ``image_id`` (else ``file_name``).
        With filter denoising, the initial filter signal (B, N, P) is drawn after ``init_boxes``, from the same generators.
        Images are batched with the others of the same padded size, so each result equals the one the image
        gets alone: padding a small image up to a larger one's size would change its border features.
        """
        if generators is not None and len(generators) != len(batched_inputs):
            raise ValueError(f"got {len(generators)} generators for {len(batched_inputs)} images")
        if generators is None and self.inference_seed >= 0:
            generators = [self._image_generator(x) for x in batched_inputs]
        batch = len(batched_inputs)
        if init_boxes is None:
            init_boxes = self.sampler.initial_signal((batch, self.num_proposals, 4), self.device, generators)
        if init_boxes.shape != (batch, self.num_proposals, 4):
            raise ValueError(
                f"init_boxes must have shape {(batch, self.num_proposals, 4)}, got {tuple(init_boxes.shape)}"
            )
        x_init = init_boxes.to(self.device)
        if self.filter_denoising:
            filters = self.sampler.initial_signal((batch, self.num_proposals, self.num_mask_params), self.device, generators)
            x_init = torch.cat([x_init, filters.to(self.device)], dim=-1)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, x in enumerate(batched_inputs):
            groups.setdefault(self._padded_size(x["image"].shape[-2:]), []).append(i)
        results: List[Optional[Dict[str, Instances]]] = [None] * len(batched_inputs)
        for idx in groups.values():
            outputs = self._inference_same_size(
                [batched_inputs[i] for i in idx],
                x_init[idx],
                None if generators is None else [generators[i] for i in idx],
                do_postprocess,
            )
            for i, out in zip(idx, outputs):
                results[i] = out
        return results

    def _image_generator(self, x: Dict) -> torch.Generator:
        """A generator seeded from INFERENCE_SEED and the image's identity, independent of batch composition."""
        key = x.get("image_id")
        if not isinstance(key, int):
            key = zlib.crc32(str(x.get("file_name", key)).encode())
        return torch.Generator(device=self.device).manual_seed(self.inference_seed * 1_000_003 + key)

    def _padded_size(self, size: Sequence[int]) -> Tuple[int, int]:
        d = max(self.backbone.size_divisibility, 1)
        return (-(-int(size[0]) // d) * d, -(-int(size[1]) // d) * d)

    def _inference_same_size(self, batched_inputs, x_init, generators, do_postprocess):
        """Inference for images that share one padded size: one backbone pass, one batched DDIM loop from x_init."""
        images, whwh = self.preprocess_image(batched_inputs)
        with torch.autocast(self.device.type, dtype=self.inference_dtype or torch.float16,
                            enabled=self.inference_dtype is not None):
            features, mask_feats = self.extract_features(images)

            def decode(boxes: torch.Tensor, filter_signal: Optional[torch.Tensor], t: torch.Tensor):
                logits, pred_boxes, filters = self.head(features, boxes, t, filter_signal, mask_feats, whwh)
                return logits[-1].float(), pred_boxes[-1].float(), filters[-1].float()

            steps = self.sampler.sample(decode, whwh, x_init, generators)
        mask_feats = mask_feats.float()
        processed = []
        for b, (x, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            candidates = [select_topk(lg[b], bx[b], fl[b], self.num_proposals) for lg, bx, fl in steps]
            scores, labels, boxes, filters = (torch.cat(c) for c in zip(*candidates))
            keep = nms_and_cap(boxes, scores, labels, self.nms_thresh, self.use_nms, 0)  # capped after empty boxes go
            inst = Instances(image_size)
            inst.pred_boxes = Boxes(boxes[keep])
            inst.scores = scores[keep]
            inst.pred_classes = labels[keep]
            inst.pred_filters = filters[keep]
            out_size = (x.get("height", image_size[0]), x.get("width", image_size[1])) if do_postprocess else image_size
            processed.append({"instances": self._paste_masks(inst, mask_feats[b], image_size, out_size)})
        return processed

    def _paste_masks(self, inst: Instances, mask_feats: torch.Tensor, input_size, output_size) -> Instances:
        """Rescale score-sorted boxes to output_size, keep the first ``max_detections`` (<= 0: all) non-empty ones
        and compute only their binary masks, running the dynamic head only inside their boxes.
        mask_feats (C, h, w) of this image."""
        out = Instances(output_size)
        boxes = inst.pred_boxes.clone()
        boxes.scale(output_size[1] / input_size[1], output_size[0] / input_size[0])
        boxes.clip(output_size)
        keep = boxes.nonempty().nonzero().squeeze(1)
        if self.max_detections > 0:
            keep = keep[: self.max_detections]
        inst, boxes = inst[keep], boxes[keep]
        mask_probs = DynamicMaskWindows(mask_feats, inst.pred_filters, *self.mask_head_layout)
        out.pred_boxes = boxes
        out.scores = inst.scores
        out.pred_classes = inst.pred_classes
        out.pred_masks = masks_to_image(mask_probs, input_size, output_size, boxes.tensor, self.mask_threshold)
        return out
