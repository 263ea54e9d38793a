"""The original release's training path, re-stated: its per-image noising of the padded ground truth, per-image and
per-gt loops of the dynamic-k matcher, per-image target gathering in the losses, pairwise GIoU, the grouped-convolution
mask head per image, detectron2's stock RoIAlign (torchvision's backward) and its optimizer construction, on the
weights of a ``DiffusionInst`` model. Written for this project from the method's description.
"""
from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision.ops as ops
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Instances
from fvcore.nn import sigmoid_focal_loss

from .inference import _with_torch_linear, cxcywh_to_xyxy, grouped_mask_head, head_forward, xyxy_to_cxcywh


def plain_box_pooler(pooler: ROIPooler) -> ROIPooler:
    """A stock detectron2 ROIPooler with pooler's settings: ROIAlign with torchvision's (serial CPU) backward."""
    level = pooler.level_poolers[0]
    return ROIPooler(
        output_size=pooler.output_size,
        scales=tuple(p.spatial_scale for p in pooler.level_poolers),
        sampling_ratio=level.sampling_ratio,
        pooler_type="ROIAlignV2" if level.aligned else "ROIAlign",
        canonical_box_size=pooler.canonical_box_size,
        canonical_level=pooler.canonical_level,
    )


def original_targets(model, gt_instances: Sequence[Instances]) -> List[Dict]:
    """The original prepare_targets: per image labels, normalised cxcywh and absolute xyxy boxes, sizes, BitMasks."""
    targets = []
    for inst in gt_instances:
        h, w = inst.image_size
        whwh = torch.as_tensor([w, h, w, h], dtype=torch.float, device=model.device)
        boxes_xyxy = inst.gt_boxes.tensor
        targets.append({
            "labels": inst.gt_classes,
            "boxes": xyxy_to_cxcywh(boxes_xyxy / whwh),
            "boxes_xyxy": boxes_xyxy,
            "image_size_xyxy": whwh,
            "image_size_xyxy_tgt": whwh.unsqueeze(0).repeat(len(boxes_xyxy), 1),
            "masks": inst.gt_masks if len(inst) else None,
        })
    return targets


def original_noisy_boxes(model, batched_inputs: Sequence[Dict]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The original prepare_diffusion_concat, image by image: abs xyxy boxes (B, N, 4) float64 and steps t (B,)."""
    n, scale, device = model.num_proposals, model.scale, model.device
    boxes, steps = [], []
    for x in batched_inputs:
        inst = x["instances"].to(device)
        h, w = inst.image_size
        size = torch.as_tensor([w, h, w, h], dtype=torch.float, device=device)
        gt = xyxy_to_cxcywh(inst.gt_boxes.tensor / size)
        t = torch.randint(0, model.num_timesteps, (1,), device=device).long()
        noise = torch.randn(n, 4, device=device)
        if len(gt) == 0:
            gt = torch.as_tensor([[0.5, 0.5, 1.0, 1.0]], dtype=torch.float, device=device)
        if len(gt) < n:
            filler = torch.randn(n - len(gt), 4, device=device) / 6.0 + 0.5
            filler[:, 2:] = torch.clip(filler[:, 2:], min=1e-4)
            x_start = torch.cat((gt, filler), dim=0)
        elif len(gt) > n:
            keep = [True] * n + [False] * (len(gt) - n)
            random.shuffle(keep)
            x_start = gt[torch.tensor(keep, device=device)]
        else:
            x_start = gt
        x_start = (x_start * 2.0 - 1.0) * scale
        x_t = model.sqrt_alphas_cumprod[t] * x_start + model.sqrt_one_minus_alphas_cumprod[t] * noise
        x_t = ((torch.clamp(x_t, min=-scale, max=scale) / scale) + 1) / 2.0
        boxes.append(cxcywh_to_xyxy(x_t))
        steps.append(t)
    images_whwh = torch.tensor([[x["image"].shape[-1], x["image"].shape[-2]] * 2 for x in batched_inputs],
                               dtype=torch.float, device=device)
    return torch.stack(boxes) * images_whwh[:, None, :], torch.cat(steps)


def in_boxes_info(
    boxes_cxcywh: torch.Tensor, gts_cxcywh: torch.Tensor, center_radius: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Centre priors of one image's queries (N, 4) vs gts (G, 4): fg (N,) in any box or centre region; both (N, G)."""
    gts = cxcywh_to_xyxy(gts_cxcywh)
    cx, cy = boxes_cxcywh[:, 0].unsqueeze(1), boxes_cxcywh[:, 1].unsqueeze(1)
    in_boxes = ((cx > gts[:, 0].unsqueeze(0)).long() + (cx < gts[:, 2].unsqueeze(0)).long()
                + (cy > gts[:, 1].unsqueeze(0)).long() + (cy < gts[:, 3].unsqueeze(0)).long()) == 4
    rx = (center_radius * (gts[:, 2] - gts[:, 0])).unsqueeze(0)
    ry = (center_radius * (gts[:, 3] - gts[:, 1])).unsqueeze(0)
    gcx, gcy = gts_cxcywh[:, 0].unsqueeze(0), gts_cxcywh[:, 1].unsqueeze(0)
    in_centers = ((cx > gcx - rx).long() + (cx < gcx + rx).long() + (cy > gcy - ry).long() + (cy < gcy + ry).long()) == 4
    return (in_boxes.sum(1) > 0) | (in_centers.sum(1) > 0), in_boxes & in_centers


def dynamic_k_matching(
    cost: torch.Tensor, ious: torch.Tensor, num_gt: int, ota_k: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One image: each gt takes its dynamic_k cheapest queries, then multiple matches and unmatched gts are resolved.

    As the original, conflicts inside the loop are resolved on the rows multi-matched before it; an iteration
    that changes nothing ends the loop (the original would spin forever there). Returns (selected (N,), gt idx).
    """
    matching = torch.zeros_like(cost)
    topk_ious, _ = torch.topk(ious, min(ota_k, len(ious)), dim=0)
    dynamic_ks = torch.clamp(topk_ious.sum(0).int(), min=1)
    for g in range(num_gt):
        _, pos = torch.topk(cost[:, g], k=int(dynamic_ks[g]), largest=False)
        matching[pos, g] = 1.0
    multi = matching.sum(1) > 1
    if multi.any():
        best = cost[multi].argmin(1)
        matching[multi] = 0.0
        matching[multi, best] = 1.0
    while (matching.sum(0) == 0).any():
        before = matching.clone()
        cost[matching.sum(1) > 0] += 100000.0
        for g in torch.nonzero(matching.sum(0) == 0, as_tuple=False).squeeze(1):
            matching[torch.argmin(cost[:, g]), g] = 1.0
        if (matching.sum(1) > 1).any():
            best = cost[multi].argmin(1)
            matching[multi] = 0.0
            matching[multi, best] = 1.0
        if torch.equal(before, matching):
            break
    selected = matching.sum(1) > 0
    return selected, matching[selected].max(1)[1]


def match_dynamic_k(
    matcher, logits: torch.Tensor, boxes: torch.Tensor, targets: List[Dict]
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """HungarianMatcherDynamicK: logits (B, N, K), abs xyxy boxes (B, N, 4) -> per image (selected, gt idx)."""
    prob = logits.detach().sigmoid()
    boxes = boxes.detach()
    alpha, gamma = matcher.focal_alpha, matcher.focal_gamma
    indices = []
    for b, target in enumerate(targets):
        labels = target["labels"]
        if len(labels) == 0:
            indices.append((torch.zeros(len(prob[b]), dtype=torch.bool, device=prob.device),
                            torch.zeros(0, dtype=torch.long, device=prob.device)))
            continue
        gt = target["boxes_xyxy"]
        fg, inside = in_boxes_info(xyxy_to_cxcywh(boxes[b]), xyxy_to_cxcywh(gt), matcher.center_radius)
        ious = ops.box_iou(boxes[b], gt)
        p = prob[b]
        neg = (1 - alpha) * (p**gamma) * (-(1 - p + 1e-8).log())
        pos = alpha * ((1 - p) ** gamma) * (-(p + 1e-8).log())
        cost_class = pos[:, labels] - neg[:, labels]
        cost_bbox = torch.cdist(boxes[b] / target["image_size_xyxy"], gt / target["image_size_xyxy_tgt"], p=1)
        cost_giou = -ops.generalized_box_iou(boxes[b], gt)
        cost = (matcher.cost_bbox * cost_bbox + matcher.cost_class * cost_class + matcher.cost_giou * cost_giou
                + 100.0 * (~inside))
        cost[~fg] = cost[~fg] + 10000.0
        indices.append(dynamic_k_matching(cost, ious, len(labels), matcher.ota_k))
    return indices


def loss_labels(
    logits: torch.Tensor, targets: List[Dict], indices, num_classes: int, alpha: float, gamma: float
) -> Dict:
    """Sigmoid focal loss over all (B*N, K) logits, per-image target classes, / number of matched queries."""
    target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
    matched = 0
    for b, (selected, gt_idx) in enumerate(indices):
        if len(gt_idx) == 0:
            continue
        target_classes[b, selected] = targets[b]["labels"][gt_idx]
        matched += len(gt_idx)
    onehot = torch.zeros((*logits.shape[:2], num_classes + 1), dtype=logits.dtype, device=logits.device)
    onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
    onehot = onehot[:, :, :-1].flatten(0, 1)
    loss = sigmoid_focal_loss(logits.flatten(0, 1), onehot, alpha=alpha, gamma=gamma, reduction="none")
    return {"loss_ce": loss.sum() / (matched if matched else 1)}


def loss_boxes(boxes: torch.Tensor, targets: List[Dict], indices) -> Dict:
    """L1 of image-normalised xyxy boxes and 1 - diag(pairwise GIoU) on absolute ones, / matched queries."""
    src, src_norm, tgt, tgt_xyxy = [], [], [], []
    for b, (selected, gt_idx) in enumerate(indices):
        if len(gt_idx) == 0:
            continue
        src.append(boxes[b][selected])
        src_norm.append(boxes[b][selected] / targets[b]["image_size_xyxy"])
        tgt.append(targets[b]["boxes"][gt_idx])
        tgt_xyxy.append(targets[b]["boxes_xyxy"][gt_idx])
    if not src:
        return {"loss_bbox": boxes.sum() * 0, "loss_giou": boxes.sum() * 0}
    src, src_norm, tgt, tgt_xyxy = torch.cat(src), torch.cat(src_norm), torch.cat(tgt), torch.cat(tgt_xyxy)
    l1 = F.l1_loss(src_norm, cxcywh_to_xyxy(tgt), reduction="none")
    giou = 1 - torch.diag(ops.generalized_box_iou(src, tgt_xyxy))
    return {"loss_bbox": l1.sum() / len(src), "loss_giou": giou.sum() / len(src)}


def dice_coefficient(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CondInst dice loss per instance of (M, H, W) probabilities and targets -> (M,)."""
    x, t = probs.reshape(len(probs), -1), target.reshape(len(target), -1)
    return 1.0 - 2 * (x * t).sum(1) / ((x**2.0).sum(1) + (t**2.0).sum(1) + 1e-5)


def loss_masks(
    kernels: torch.Tensor, mask_feat: torch.Tensor, targets: List[Dict], indices, layout: Tuple[int, int, int]
) -> Dict:
    """Dice loss image by image: grouped-conv mask head over F_mask (B, c, h, w) repeated per matched query."""
    in_ch, ch, layers = layout
    weight_nums = [in_ch * ch] + [ch * ch] * (layers - 2) + [ch]
    bias_nums = [ch] * (layers - 1) + [1]
    total, num = 0, 0
    for b, (selected, gt_idx) in enumerate(indices):
        if len(gt_idx) == 0:
            continue
        logits = grouped_mask_head(mask_feat[b : b + 1], kernels[b][selected], ch, weight_nums, bias_nums)
        gt = targets[b]["masks"][gt_idx].tensor.float()
        img_h, img_w = mask_feat.shape[2] * 4, mask_feat.shape[3] * 4
        gt = F.pad(gt, (0, img_w - gt.shape[2], 0, img_h - gt.shape[1]), "constant", 0)
        gt = gt[:, 2::4, 2::4].gt(0.5).float()
        total = total + dice_coefficient(logits.sigmoid(), gt).sum()
        num += len(gt_idx)
    return {"loss_masks": total / num if num else kernels.sum() * 0}


@_with_torch_linear
def original_training_losses(model, batched_inputs: Sequence[Dict], boxes: torch.Tensor, t: torch.Tensor) -> Dict:
    """The original training losses for noisy abs xyxy boxes (B, N, 4) at steps t (B,); weighted, our loss keys.

    Weights, matcher costs, deep supervision and mask deep supervision are those of model's config.
    """
    crit = model.criterion
    if crit.use_fed_loss or not crit.use_focal:
        raise ValueError("the reference re-states the sigmoid focal loss path only (USE_FOCAL, no USE_FED_LOSS)")
    images, _ = model.preprocess_image(batched_inputs)
    src = model.backbone(images.tensor)
    features = [src[f] for f in model.in_features]
    targets = original_targets(model, [x["instances"].to(model.device) for x in batched_inputs])
    pooler = plain_box_pooler(model.head.box_pooler)
    cls, coord, ker, mask_feat = head_forward(model.head, features, boxes, t, pooler=pooler)
    last = len(cls) - 1
    losses = {}
    for s in range(last + 1) if model.head.deep_supervision else [last]:
        indices = match_dynamic_k(crit.matcher, cls[s], coord[s], targets)
        stage = loss_labels(cls[s], targets, indices, model.num_classes, crit.focal_alpha, crit.focal_gamma)
        stage.update(loss_boxes(coord[s], targets, indices))
        if s == last or crit.mask_deep_supervision:
            stage.update(loss_masks(ker[s], mask_feat, targets, indices, crit.mask_head_layout))
        suffix = "" if s == last else f"_{s}"
        losses.update({k + suffix: v * crit.weight_dict[k] for k, v in stage.items()})
    return losses


def original_training_forward(model, batched_inputs: Sequence[Dict]) -> Dict:
    """One original training forward: noise the padded ground truth image by image, then the weighted losses."""
    boxes, t = original_noisy_boxes(model, batched_inputs)
    return original_training_losses(model, batched_inputs, boxes, t)


def original_optimizer(cfg, model) -> torch.optim.Optimizer:
    """The original release's optimizer: one parameter group per trainable tensor (backbone lr x BACKBONE_MULTIPLIER,
    SOLVER.WEIGHT_DECAY on every tensor), torch's AdamW with its default implementation, full-model gradient clipping."""
    groups = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = cfg.SOLVER.BASE_LR * (cfg.SOLVER.BACKBONE_MULTIPLIER if "backbone" in name else 1.0)
            groups.append({"params": [p], "lr": lr, "weight_decay": cfg.SOLVER.WEIGHT_DECAY})
    max_norm = cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE

    class ClippedAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], max_norm)
            return super().step(closure=closure)

    return ClippedAdamW(groups, cfg.SOLVER.BASE_LR)
