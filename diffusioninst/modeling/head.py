"""DiffusionInst head: the DiffusionDet decoder (6 refinement stages) plus the mask branch and time embedding.

The module tree (``head_series``, ``mask_refine``, ``mask_head``, ``time_mlp``) reproduces the original
release's parameter names so its checkpoints load unchanged.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes
from torch import nn

from ..layers.roi_pool import LevelSelectROIPooler
from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .diffusion import signal_from_filters
from .dynamic_mask_head import dynamic_mask_logits, num_mask_head_params
from .mask_branch import MaskRefine, MaskTower
from .postprocess import mask_extent_boxes

__all__ = ["SinusoidalTimeEmbedding", "DynamicInteraction", "DecoderStage", "DiffusionInstHead"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the diffusion step: (B,) -> (B, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class DynamicInteraction(nn.Module):
    """Sparse R-CNN's dynamic instance interaction: two 1x1 layers generated from each proposal feature."""

    def __init__(self, hidden_dim: int, dim_dynamic: int, num_dynamic: int, pooler_resolution: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.dim_dynamic = dim_dynamic
        self.num_params = hidden_dim * dim_dynamic
        self.dynamic_layer = nn.Linear(hidden_dim, num_dynamic * self.num_params)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.out_layer = nn.Linear(hidden_dim * pooler_resolution**2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, pro_features: torch.Tensor, roi_features: torch.Tensor) -> torch.Tensor:
        """pro_features (R, d), roi_features (R, S*S, d) -> (R, d) with R = batch * proposals."""
        # split (not two slices): its backward concatenates the two gradients instead of zero-filling two copies.
        param1, param2 = self.dynamic_layer(pro_features).split(self.num_params, dim=1)
        param1 = param1.view(-1, self.hidden_dim, self.dim_dynamic)
        param2 = param2.view(-1, self.dim_dynamic, self.hidden_dim)
        x = F.relu(self.norm1(torch.bmm(roi_features, param1)), inplace=True)  # in place: no second buffer per layer
        x = F.relu(self.norm2(torch.bmm(x, param2)), inplace=True)
        return F.relu(self.norm3(self.out_layer(x.flatten(1))))


def _linear_ln_relu_blocks(dim: int, num_blocks: int) -> nn.ModuleList:
    layers: List[nn.Module] = []
    for _ in range(num_blocks):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
    return nn.ModuleList(layers)


class DecoderStage(nn.Module):
    """One DiffusionDet refinement stage; also predicts the instance-aware filters theta (the controller)."""

    def __init__(
        self,
        d_model: int,
        num_classes: int,
        num_mask_params: int,
        dim_feedforward: int = 2048,
        nhead: int = 8,
        dropout: float = 0.0,
        activation: str = "relu",
        num_cls: int = 1,
        num_reg: int = 3,
        dim_dynamic: int = 64,
        num_dynamic: int = 2,
        pooler_resolution: int = 7,
        bbox_weights: Tuple[float, float, float, float] = (2.0, 2.0, 1.0, 1.0),
        scale_clamp: float = math.log(100000.0 / 16),
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MODEL.DiffusionInst.ACTIVATION must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.d_model = d_model
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.inst_interact = DynamicInteraction(d_model, dim_dynamic, num_dynamic, pooler_resolution)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.controller = nn.Linear(d_model, num_mask_params)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]
        self.block_time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(d_model * 4, d_model * 2))
        self.cls_module = _linear_ln_relu_blocks(d_model, num_cls)
        self.reg_module = _linear_ln_relu_blocks(d_model, num_reg)
        self.class_logits = nn.Linear(d_model, num_classes)
        self.bboxes_delta = nn.Linear(d_model, 4)
        self.box2box_transform = Box2BoxTransform(weights=bbox_weights, scale_clamp=scale_clamp)

    def forward(
        self,
        roi_features: torch.Tensor,
        boxes: torch.Tensor,
        pro_features: Optional[torch.Tensor],
        time_emb: torch.Tensor,
        condition: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Refine B x N boxes once.

        roi_features (B*N, d, S, S) pooled for ``boxes`` (B, N, 4) abs xyxy; pro_features (B*N, d) from the
        previous stage or None (first stage: mean of the RoI feature); time_emb (B, 4d); condition (B*N, d), if
        given, is added to the proposal features (filter denoising: the embedded filter signal).
        Returns class logits (B, N, K), boxes (B, N, 4), proposal features (B*N, d), filters (B, N, P).
        """
        b, n = boxes.shape[:2]
        d = self.d_model
        roi = roi_features.view(b * n, d, -1)
        if pro_features is None:
            pro_features = roi.mean(-1)
        if condition is not None:
            pro_features = pro_features + condition
        roi = roi.permute(0, 2, 1)

        # Self-attention among the N proposals of each image (sequence-first layout).
        x = pro_features.view(b, n, d).permute(1, 0, 2)
        x = self.norm1(x + self.dropout1(self.self_attn(x, x, value=x)[0]))

        # Dynamic instance interaction with the proposal's own RoI feature.
        x = x.permute(1, 0, 2).reshape(b * n, d)
        x = self.norm2(x + self.dropout2(self.inst_interact(x, roi)))

        # FFN.
        obj_features = self.norm3(x + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x))))))

        # Time conditioning: x * (scale + 1) + shift.
        scale, shift = torch.repeat_interleave(self.block_time_mlp(time_emb), n, dim=0).chunk(2, dim=1)
        fc_feature = obj_features * (scale + 1) + shift

        cls_feature = fc_feature
        for layer in self.cls_module:
            cls_feature = layer(cls_feature)
        reg_feature = fc_feature
        for layer in self.reg_module:
            reg_feature = layer(reg_feature)

        class_logits = self.class_logits(cls_feature)
        deltas = self.bboxes_delta(reg_feature)
        filters = self.controller(reg_feature)
        # Box arithmetic in float32 also under autocast: half-precision coordinates would be off by pixels.
        pred_boxes = self.box2box_transform.apply_deltas(deltas.float(), boxes.reshape(-1, 4).float())
        return class_logits.view(b, n, -1), pred_boxes.view(b, n, 4), obj_features, filters.view(b, n, -1)


class DiffusionInstHead(nn.Module):
    """Decoder stages over RoI features of noisy boxes, the time MLP, and the mask branch producing F_mask."""

    @configurable
    def __init__(
        self,
        stage: DecoderStage,
        num_stages: int,
        box_pooler: LevelSelectROIPooler,
        hidden_dim: int,
        num_mask_levels: int = 3,
        mask_branch_channels: int = 128,
        mask_branch_num_convs: int = 4,
        mask_dim: int = 8,
        deep_supervision: bool = True,
        prior_prob: float = 0.01,
        filter_denoising: bool = False,
        boxes_from_masks: bool = False,
        snr_scale: float = 2.0,
        filter_range: float = 4.0,
        mask_head_layout: Tuple[int, int, int] = (8, 8, 3),
        mask_stride: int = 4,
        mask_box_search_scale: float = 1.5,
    ):
        super().__init__()
        self.box_pooler = box_pooler
        self.head_series = nn.ModuleList([copy.deepcopy(stage) for _ in range(num_stages)])
        # Filter denoising (beyond the paper): each stage embeds the filter signal it is given (the noisy state at
        # the first stage, the previous stage's filters after it) into its proposal features.
        self.filter_embed = (
            nn.ModuleList([nn.Linear(stage.controller.out_features, hidden_dim) for _ in range(num_stages)])
            if filter_denoising else None
        )
        self.mask_refine = MaskRefine(num_mask_levels, hidden_dim, mask_branch_channels)
        self.mask_head = MaskTower(mask_branch_channels, mask_branch_num_convs, mask_dim)
        time_dim = hidden_dim * 4
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(hidden_dim),
            nn.Linear(hidden_dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )
        self.deep_supervision = deep_supervision
        self.boxes_from_masks = boxes_from_masks
        self.snr_scale = snr_scale
        self.filter_range = filter_range
        self.mask_head_layout = mask_head_layout
        self.mask_stride = mask_stride
        self.mask_box_search_scale = mask_box_search_scale
        self._reset_parameters(prior_prob)
        if boxes_from_masks:  # the box regression is unused: its boxes come from the masks
            for stage in self.head_series:
                stage.bboxes_delta.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
        """The head of the config for a backbone with outputs ``input_shape`` (name -> ShapeSpec)."""
        d = cfg.MODEL.DiffusionInst
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        for key, names in (("MODEL.ROI_HEADS.IN_FEATURES", in_features),
                           ("MODEL.DiffusionInst.MASK_IN_FEATURES", d.MASK_IN_FEATURES)):
            missing = [f for f in names if f not in input_shape]
            if missing:
                raise ValueError(f"{key} names {missing}, which the backbone does not output (it has "
                                 f"{sorted(input_shape)})")
        resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        mask_layout = (d.MASK_DIM, d.MASK_HEAD_CHANNELS, d.MASK_HEAD_LAYERS)
        stage = DecoderStage(
            d_model=d.HIDDEN_DIM, num_classes=d.NUM_CLASSES, num_mask_params=num_mask_head_params(*mask_layout),
            dim_feedforward=d.DIM_FEEDFORWARD, nhead=d.NHEADS, dropout=d.DROPOUT, activation=d.ACTIVATION,
            num_cls=d.NUM_CLS, num_reg=d.NUM_REG, dim_dynamic=d.DIM_DYNAMIC, num_dynamic=d.NUM_DYNAMIC,
            pooler_resolution=resolution,
        )
        box_pooler = LevelSelectROIPooler(
            output_size=resolution, scales=tuple(1.0 / input_shape[f].stride for f in in_features),
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO, pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        )
        return {
            "stage": stage, "num_stages": d.NUM_HEADS, "box_pooler": box_pooler, "hidden_dim": d.HIDDEN_DIM,
            "num_mask_levels": len(d.MASK_IN_FEATURES), "mask_branch_channels": d.MASK_BRANCH_CHANNELS,
            "mask_branch_num_convs": d.MASK_BRANCH_NUM_CONVS, "mask_dim": d.MASK_DIM,
            "deep_supervision": d.DEEP_SUPERVISION, "prior_prob": d.PRIOR_PROB, "filter_denoising": d.FILTER_DENOISING,
            "boxes_from_masks": not d.USE_BOX_LOSS, "snr_scale": d.SNR_SCALE, "filter_range": d.FILTER_SIGNAL_RANGE,
            "mask_head_layout": mask_layout, "mask_stride": input_shape[d.MASK_IN_FEATURES[0]].stride,
            "mask_box_search_scale": d.MASK_BOX_SEARCH_SCALE,
        }

    def _reset_parameters(self, prior_prob: float) -> None:
        """Xavier-uniform for every matrix; the focal prior only on the classification biases; zero filter embeddings.

        (The original set the prior on any parameter whose last dimension equals NUM_CLASSES, which for
        small class counts overwrites unrelated weights; this sets it where it belongs.)
        """
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        bias_value = -math.log((1 - prior_prob) / prior_prob)
        for stage in self.head_series:
            nn.init.constant_(stage.class_logits.bias, bias_value)
        if self.filter_embed is not None:  # zero: training starts from the paper's model and learns to use the filters
            for embed in self.filter_embed:
                nn.init.zeros_(embed.weight)
                nn.init.zeros_(embed.bias)

    def mask_features(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """F_mask (B, c, H/4, W/4) from the mask-branch FPN levels (finest first)."""
        return self.mask_head(self.mask_refine(features))

    def forward(
        self,
        features: Sequence[torch.Tensor],
        boxes: torch.Tensor,
        t: torch.Tensor,
        filter_signal: Optional[torch.Tensor] = None,
        mask_feats: Optional[torch.Tensor] = None,
        images_whwh: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run every stage on boxes (B, N, 4) abs xyxy at diffusion steps t (B,).

        With filter denoising, ``filter_signal`` (B, N, P) is the noisy filter state (clamped to the signal range
        here). With boxes from masks, ``mask_feats`` (B, c, h, w) and ``images_whwh`` (B, 4) give each stage's
        boxes as the extent of its masks. Returns class logits (S, B, N, K), boxes (S, B, N, 4) and filters
        (S, B, N, P), with S the number of stages if deep supervision is on, else 1 (the last stage).
        """
        if (self.filter_embed is not None) != (filter_signal is not None):
            raise ValueError("filter_signal must be given exactly when the head was built for filter denoising")
        if self.boxes_from_masks and (mask_feats is None or images_whwh is None):
            raise ValueError("boxes from masks need mask_feats and images_whwh")
        time_emb = self.time_mlp(t)
        pro_features = None
        if filter_signal is not None:
            filter_signal = torch.clamp(filter_signal, -self.snr_scale, self.snr_scale)
        outputs: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for i, stage in enumerate(self.head_series):
            roi_features = self.box_pooler(list(features), [Boxes(b) for b in boxes])
            condition = None
            if self.filter_embed is not None:
                condition = self.filter_embed[i](filter_signal.to(roi_features.dtype)).flatten(0, 1)
            logits, pred_boxes, pro_features, filters = stage(roi_features, boxes, pro_features, time_emb, condition)
            if self.boxes_from_masks:
                pred_boxes = self._mask_boxes(mask_feats, filters, boxes, images_whwh)
            outputs.append((logits, pred_boxes, filters))
            boxes = pred_boxes.detach()
            if self.filter_embed is not None:
                filter_signal = signal_from_filters(filters.detach(), self.snr_scale, self.filter_range)
        if not self.deep_supervision:
            outputs = outputs[-1:]
        logits, pred_boxes, filters = (torch.stack(x) for x in zip(*outputs))
        return logits, pred_boxes, filters

    @torch.no_grad()
    def _mask_boxes(
        self, mask_feats: torch.Tensor, filters: torch.Tensor, boxes: torch.Tensor, images_whwh: torch.Tensor
    ) -> torch.Tensor:
        """Boxes (B, N, 4) enclosing each proposal's mask (logit > 0) for filters (B, N, P), clipped to its image.

        Only mask cells within the proposal's input box ``boxes`` (B, N, 4), scaled about its centre by
        ``mask_box_search_scale``, count: phi has no position input, so its masks also fire on look-alike instances
        elsewhere, which the paper's method crops away with the predicted box. A proposal without such a cell keeps
        its input box.
        """
        b, n = filters.shape[:2]
        image_index = torch.arange(b, device=filters.device).repeat_interleave(n)
        logits = dynamic_mask_logits(mask_feats, filters.flatten(0, 1), image_index, *self.mask_head_layout)
        fallback = boxes.flatten(0, 1).float()
        region = box_xyxy_to_cxcywh(fallback)
        region[:, 2:] *= self.mask_box_search_scale
        region = box_cxcywh_to_xyxy(region)
        out = mask_extent_boxes(logits, self.mask_stride, fallback, region).view(b, n, 4)
        return torch.minimum(out, images_whwh[:, None, :].float())
