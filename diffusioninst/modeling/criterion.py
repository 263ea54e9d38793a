"""DiffusionInst losses: focal classification, L1 and GIoU boxes, dice masks; every decoder stage supervised."""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from fvcore.nn import sigmoid_focal_loss
from torch import nn

from ..data.datasets import class_image_count

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .dynamic_mask_head import dynamic_mask_logits
from .losses import dice_loss, fed_loss_class_weights, federated_loss_classes, giou_loss, l1_box_loss
from .matcher import DynamicKMatcher, PaddedTargets, pad_targets

__all__ = ["SetCriterion", "downsample_gt_masks"]


def downsample_gt_masks(masks: torch.Tensor, out_size: Tuple[int, int], stride: int = 4) -> torch.Tensor:
    """Sample ground-truth masks (G, H, W) at the centres of F_mask's cells -> float (G, h, w) in {0, 1}.

    Masks are zero-padded to (h*stride, w*stride), then every stride-th pixel starting at stride // 2 is taken.
    """
    h, w = out_size
    masks = masks.to(torch.float32)
    masks = F.pad(masks, (0, w * stride - masks.shape[-1], 0, h * stride - masks.shape[-2]), value=0.0)
    start = stride // 2
    return masks[:, start::stride, start::stride].gt(0.5).float()


def _fed_loss_weights(train_set: Optional[str], num_classes: int, power: float) -> torch.Tensor:
    """The federated loss's class weights (K,) from the image counts of the training set's classes."""
    if train_set is None:
        raise ValueError("MODEL.DiffusionInst.USE_FED_LOSS needs a training set (DATASETS.TRAIN) to count classes")
    return fed_loss_class_weights(class_image_count(train_set, num_classes), power)


class SetCriterion(nn.Module):
    """Matches predictions to ground truth with the dynamic-k matcher at every stage and sums weighted losses.

    Loss keys: ``loss_ce``, ``loss_bbox``, ``loss_giou``, ``loss_masks`` for the last stage and the same with
    ``_{i}`` for earlier stage i (no box terms with ``use_box_loss`` off). Each term is normalised by the number
    of matched proposals.
    """

    @configurable
    def __init__(
        self,
        num_classes: int,
        matcher: DynamicKMatcher,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 5.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        use_focal: bool = True,
        use_fed_loss: bool = False,
        fed_loss_class_weights: Union[torch.Tensor, Callable[[], torch.Tensor], None] = None,
        fed_loss_num_classes: int = 50,
        mask_deep_supervision: bool = True,
        mask_head_layout: Tuple[int, int, int] = (8, 8, 3),
        mask_stride: int = 4,
        use_box_loss: bool = True,
    ):
        super().__init__()
        if not (use_focal or use_fed_loss):
            raise ValueError("DiffusionInst needs USE_FOCAL or USE_FED_LOSS (softmax classification is not supported)")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = {
            "loss_ce": class_weight, "loss_bbox": l1_weight, "loss_giou": giou_weight, "loss_masks": mask_weight,
        }
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.use_focal = use_focal
        self.use_fed_loss = use_fed_loss
        self.fed_loss_num_classes = fed_loss_num_classes
        # The federated loss's per-class weights (K,), or a function that gives them on the first training forward
        # (they come from the training set, which evaluation never reads).
        self._fed_loss_weights_source = fed_loss_class_weights if callable(fed_loss_class_weights) else None
        if use_fed_loss and fed_loss_class_weights is None:
            raise ValueError("USE_FED_LOSS needs the class frequency weights (or a function that gives them)")
        weights = None if self._fed_loss_weights_source is not None else fed_loss_class_weights
        if use_fed_loss and weights is not None:
            self._check_fed_loss_weights(weights)
        self.register_buffer("fed_loss_class_weights", None if weights is None else weights.float(), persistent=False)
        self.mask_deep_supervision = mask_deep_supervision
        self.mask_head_layout = mask_head_layout
        self.mask_stride = mask_stride
        self.use_box_loss = use_box_loss

    @classmethod
    def from_config(cls, cfg, mask_stride: int = 4) -> dict:
        d = cfg.MODEL.DiffusionInst
        fed_weights = None
        if d.USE_FED_LOSS:  # class image counts of the training set, read at the first training iteration
            train_set = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None
            fed_weights = partial(_fed_loss_weights, train_set, d.NUM_CLASSES, d.FED_LOSS_FREQ_WEIGHT_POWER)
        return {
            "num_classes": d.NUM_CLASSES, "matcher": DynamicKMatcher(cfg), "class_weight": d.CLASS_WEIGHT,
            "l1_weight": d.L1_WEIGHT, "giou_weight": d.GIOU_WEIGHT, "mask_weight": d.MASK_WEIGHT, "focal_alpha": d.ALPHA,
            "focal_gamma": d.GAMMA, "use_focal": d.USE_FOCAL, "use_fed_loss": d.USE_FED_LOSS,
            "fed_loss_class_weights": fed_weights, "fed_loss_num_classes": d.FED_LOSS_NUM_CLASSES,
            "mask_deep_supervision": d.MASK_DEEP_SUPERVISION,
            "mask_head_layout": (d.MASK_DIM, d.MASK_HEAD_CHANNELS, d.MASK_HEAD_LAYERS), "mask_stride": mask_stride,
            "use_box_loss": d.USE_BOX_LOSS,
        }

    def _check_fed_loss_weights(self, weights: torch.Tensor) -> None:
        if weights.shape != (self.num_classes,):
            raise ValueError(f"USE_FED_LOSS needs one class frequency weight per class (got shape "
                             f"{tuple(weights.shape)}, MODEL.DiffusionInst.NUM_CLASSES={self.num_classes})")

    def _fed_loss_weights(self, device: torch.device) -> torch.Tensor:
        """The federated loss's class weights (K,), computed from their source on first use."""
        if self.fed_loss_class_weights is None:
            weights = self._fed_loss_weights_source()
            self._check_fed_loss_weights(weights)
            self.fed_loss_class_weights = weights.float().to(device)
        return self.fed_loss_class_weights

    def forward(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        pred_filters: torch.Tensor,
        mask_feats: torch.Tensor,
        targets: List[Dict[str, torch.Tensor]],
    ) -> Dict[str, torch.Tensor]:
        """Weighted losses for stage outputs (S, B, N, ...), F_mask (B, c, h, w) and per-image targets.

        Each target holds ``labels`` (G,), ``boxes_xyxy`` (G, 4) absolute, ``image_size_xyxy`` (4,) and
        ``masks`` (G, H, W) at the (unpadded) input resolution.
        """
        # Ground truth of the whole batch in one tensor each, made once: every stage gathers its matches from them.
        gt = pad_targets(targets, pred_boxes.device, pred_boxes.dtype)
        gt_masks = torch.cat([downsample_gt_masks(t["masks"], mask_feats.shape[-2:], self.mask_stride)
                              for t in targets]).to(mask_feats.device)  # (sum of G, h, w)
        offsets = torch.tensor([0] + gt.counts[:-1], device=mask_feats.device).cumsum(0)
        num_stages = pred_logits.shape[0]
        losses: Dict[str, torch.Tensor] = {}
        for s in range(num_stages):
            last = s == num_stages - 1
            suffix = "" if last else f"_{s}"
            matches = self._gather(*self.matcher.match(pred_logits[s], pred_boxes[s], gt))
            stage = self.loss_labels(pred_logits[s], gt, matches)
            if self.use_box_loss:
                stage.update(self.loss_boxes(pred_boxes[s], gt, matches))
            if last or self.mask_deep_supervision:
                target = gt_masks[offsets[matches[0]] + matches[2]]
                stage.update(self.loss_masks(pred_filters[s], mask_feats, target, matches))
            losses.update({k + suffix: v * self.weight_dict[k] for k, v in stage.items()})
        return losses

    @staticmethod
    def _gather(selected: torch.Tensor, first_gt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Matches selected (B, N) bool, gt index (B, N) -> (image index, query index, gt index), each (S,), in
        image-then-query order (one host sync: the number of matches)."""
        img, qry = selected.nonzero(as_tuple=True)
        return img, qry, first_gt[img, qry]

    def loss_labels(self, logits: torch.Tensor, gt: PaddedTargets, matches) -> Dict[str, torch.Tensor]:
        """Sigmoid focal (or BCE with the federated loss) over all B x N x K logits."""
        b, n, k = logits.shape
        img, qry, gt_idx = matches
        target_classes = torch.full((b, n), k, dtype=torch.int64, device=logits.device)
        if len(qry):
            target_classes[img, qry] = gt.labels[img, gt_idx].to(logits.device)
        onehot = F.one_hot(target_classes, k + 1)[..., :k].to(logits.dtype).flatten(0, 1)
        flat = logits.flatten(0, 1)
        if self.use_focal:
            cls_loss = sigmoid_focal_loss(flat, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        else:
            cls_loss = F.binary_cross_entropy_with_logits(flat, onehot, reduction="none")
        if self.use_fed_loss:
            classes = federated_loss_classes(
                target_classes.flatten(), self.fed_loss_num_classes, k, self._fed_loss_weights(logits.device)
            )
            keep = torch.zeros(k + 1, device=logits.device, dtype=cls_loss.dtype)
            keep[classes] = 1
            cls_loss = cls_loss * keep[:k]
        num_matched = max(len(qry), 1)
        return {"loss_ce": cls_loss.sum() / num_matched}

    def loss_boxes(self, boxes: torch.Tensor, gt: PaddedTargets, matches) -> Dict[str, torch.Tensor]:
        """L1 on boxes normalised by the image size, and GIoU on absolute boxes, over matched proposals."""
        img, qry, gt_idx = matches
        if len(qry) == 0:
            zero = boxes.sum() * 0
            return {"loss_bbox": zero, "loss_giou": zero}
        src = boxes[img, qry]
        whwh = gt.whwh[:, 0].to(src)[img]
        tgt = gt.boxes[img, gt_idx].to(src)
        # The original compares against the normalised cx,cy,w,h target mapped back to x1,y1,x2,y2.
        tgt_norm = box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(tgt / whwh))
        num = len(qry)
        return {
            "loss_bbox": l1_box_loss(src / whwh, tgt_norm).sum() / num,
            "loss_giou": giou_loss(src, tgt).sum() / num,
        }

    def loss_masks(self, filters: torch.Tensor, mask_feats: torch.Tensor, target: torch.Tensor,
                   matches) -> Dict[str, torch.Tensor]:
        """Dice loss of phi(F_mask; theta) against the matched ground-truth masks ``target`` (S, h, w), sampled at
        stride 4."""
        img, qry, _ = matches
        if len(qry) == 0:
            return {"loss_masks": filters.sum() * 0 + mask_feats.sum() * 0}
        in_ch, ch, layers = self.mask_head_layout
        # The dice sums run over every cell: in float32 also under autocast.
        logits = dynamic_mask_logits(mask_feats, filters[img, qry], img, in_ch, ch, layers).float()
        target = target.to(logits)
        return {"loss_masks": dice_loss(logits.sigmoid(), target).sum() / len(qry)}
