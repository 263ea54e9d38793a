"""A straightforward re-statement of the original release's inference and training code paths, for equivalence tests.

Inference keeps the original's tensor layouts and algorithms (sequence-first attention inputs, (1, B*N, d) proposal
features, the mask branch recomputed at every step, filters repeated for every class before top-k, the mask
head as a grouped convolution over a repeated feature map, a per-mask crop loop, batch size 1). Training keeps
its per-image noising of the padded ground truth, per-image and per-gt loops of the dynamic-k matcher, per-image
target gathering in the losses, pairwise GIoU, the grouped-convolution mask head per image, and detectron2's stock
RoIAlign (torchvision's backward). Both reuse the weights of a ``DiffusionInst`` model. Written for this project
from the method's description.
"""
from __future__ import annotations

import contextlib
import functools
import math
import random
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision.ops as ops
from detectron2.layers import batched_nms
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, Instances
from fvcore.nn import sigmoid_focal_loss
from torch import nn

from diffusioninst.layers import OneDNNLinear
from diffusioninst.modeling.mask_branch import aligned_bilinear


@contextlib.contextmanager
def torch_linear(model) -> Iterator[None]:
    """The original's Linear layers are torch's own (F.linear, MKL on CPU): switch ours off for the duration."""
    layers = [m for m in model.modules() if type(m) is OneDNNLinear]
    for m in layers:
        m.__class__ = nn.Linear
    try:
        yield
    finally:
        for m in layers:
            m.__class__ = OneDNNLinear


def _with_torch_linear(fn):
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with torch_linear(model):
            return fn(model, *args, **kwargs)

    return wrapper


def cxcywh_to_xyxy(x):
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def xyxy_to_cxcywh(x):
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def stage_forward(stage, features, bboxes, pro_features, pooler, time_emb):
    n_img, nr_boxes = bboxes.shape[:2]
    d = stage.d_model
    roi_features = pooler(features, [Boxes(bboxes[b]) for b in range(n_img)])
    if pro_features is None:
        pro_features = roi_features.view(n_img, nr_boxes, d, -1).mean(-1)
    roi_features = roi_features.view(n_img * nr_boxes, d, -1).permute(2, 0, 1)
    pro_features = pro_features.view(n_img, nr_boxes, d).permute(1, 0, 2)
    pro2 = stage.self_attn(pro_features, pro_features, value=pro_features)[0]
    pro_features = stage.norm1(pro_features + pro2)
    pro_features = pro_features.view(nr_boxes, n_img, d).permute(1, 0, 2).reshape(1, n_img * nr_boxes, d)
    inter = stage.inst_interact
    feats = roi_features.permute(1, 0, 2)
    params = inter.dynamic_layer(pro_features).permute(1, 0, 2)
    p1 = params[:, :, : inter.num_params].view(-1, inter.hidden_dim, inter.dim_dynamic)
    p2 = params[:, :, inter.num_params :].view(-1, inter.dim_dynamic, inter.hidden_dim)
    feats = F.relu(inter.norm1(torch.bmm(feats, p1)))
    feats = F.relu(inter.norm2(torch.bmm(feats, p2)))
    feats = F.relu(inter.norm3(inter.out_layer(feats.flatten(1))))
    obj = stage.norm2(pro_features + feats)
    obj = stage.norm3(obj + stage.linear2(F.relu(stage.linear1(obj))))
    fc = obj.transpose(0, 1).reshape(n_img * nr_boxes, -1)
    scale_shift = torch.repeat_interleave(stage.block_time_mlp(time_emb), nr_boxes, dim=0)
    scale, shift = scale_shift.chunk(2, dim=1)
    fc = fc * (scale + 1) + shift
    cls_f, reg_f = fc.clone(), fc.clone()
    for layer in stage.cls_module:
        cls_f = layer(cls_f)
    for layer in stage.reg_module:
        reg_f = layer(reg_f)
    logits = stage.class_logits(cls_f)
    deltas = stage.bboxes_delta(reg_f)
    kernel = stage.controller(reg_f)
    boxes = bboxes.view(-1, 4).to(deltas.dtype)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0::4] / 2.0, deltas[:, 1::4] / 2.0
    dw = torch.clamp(deltas[:, 2::4], max=math.log(100000.0 / 16))
    dh = torch.clamp(deltas[:, 3::4], max=math.log(100000.0 / 16))
    px, py = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    pw, ph = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
    pred = torch.zeros_like(deltas)
    pred[:, 0::4], pred[:, 1::4] = px - 0.5 * pw, py - 0.5 * ph
    pred[:, 2::4], pred[:, 3::4] = px + 0.5 * pw, py + 0.5 * ph
    return logits.view(n_img, nr_boxes, -1), pred.view(n_img, nr_boxes, -1), obj, kernel.view(n_img, nr_boxes, -1)


def head_forward(head, features, init_bboxes, t, pooler=None):
    """The original DynamicHead.forward: mask branch, then every stage (RoIs by pooler, default head.box_pooler)."""
    pooler = head.box_pooler if pooler is None else pooler
    time = head.time_mlp(t)
    mask_feat = None
    for i, x in enumerate(features):
        if i == 0:
            mask_feat = head.mask_refine[i](x)
        elif i <= 2:
            x_p = head.mask_refine[i](x)
            mask_feat = mask_feat + aligned_bilinear(x_p, mask_feat.shape[2] // x_p.shape[2])
    mask_feat = head.mask_head(mask_feat)
    bboxes, pro = init_bboxes, None
    cls_all, box_all, ker_all = [], [], []
    for stage in head.head_series:
        logits, pred, pro, ker = stage_forward(stage, features, bboxes, pro, pooler, time)
        cls_all.append(logits)
        box_all.append(pred)
        ker_all.append(ker)
        bboxes = pred.detach()
    return torch.stack(cls_all), torch.stack(box_all), torch.stack(ker_all), mask_feat


def parse_params(params, channels, weight_nums, bias_nums):
    n = params.size(0)
    splits = list(torch.split_with_sizes(params, weight_nums + bias_nums, dim=1))
    weights, biases = splits[: len(weight_nums)], splits[len(weight_nums) :]
    for i in range(len(weight_nums)):
        out = channels if i < len(weight_nums) - 1 else 1
        weights[i] = weights[i].reshape(n * out, -1, 1, 1)
        biases[i] = biases[i].reshape(n * out)
    return weights, biases


def grouped_mask_head(mask_feat_1chw, kernels, channels=8, weight_nums=(64, 64, 8), bias_nums=(8, 8, 1)):
    """Mask logits (M, H, W) by the grouped convolution over F_mask repeated M times."""
    m = len(kernels)
    weights, biases = parse_params(kernels, channels, list(weight_nums), list(bias_nums))
    x = mask_feat_1chw.repeat(1, m, 1, 1)
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, w, bias=b, stride=1, padding=0, groups=m)
        if i < len(weights) - 1:
            x = F.relu(x)
    return x.reshape(m, mask_feat_1chw.shape[2], mask_feat_1chw.shape[3])


def topk_repeated(logits, boxes, kernels, num_proposals, num_classes):
    """Top-k over all (proposal, class) scores with boxes and filters repeated for every class."""
    scores = torch.sigmoid(logits)
    labels = torch.arange(num_classes).unsqueeze(0).repeat(num_proposals, 1).flatten(0, 1)
    scores, idx = scores.flatten(0, 1).topk(num_proposals, sorted=False)
    ker = kernels.view(-1, 1, kernels.shape[-1]).repeat(1, num_classes, 1).view(-1, kernels.shape[-1])[idx]
    box = boxes.view(-1, 1, 4).repeat(1, num_classes, 1).view(-1, 4)[idx]
    return box, scores, labels[idx], ker


def postprocess(boxes, scores, labels, mask_probs, input_size, output_size):
    """Resize to the output size; masks upsampled in full, thresholded, then cropped box by box in a loop."""
    out_h, out_w = output_size
    boxes = Boxes(boxes.clone())
    boxes.scale(out_w / input_size[1], out_h / input_size[0])
    boxes.clip(output_size)
    masks = aligned_bilinear(mask_probs.unsqueeze(1), 4)[:, :, : input_size[0], : input_size[1]]
    masks = F.interpolate(masks, size=(out_h, out_w), mode="bilinear", align_corners=False).squeeze(1)
    masks.gt_(0.5)
    b = boxes.tensor.long()
    cropped = []
    for i in range(len(masks)):
        keep = torch.zeros_like(masks[i])
        keep[b[i, 1] : b[i, 3], b[i, 0] : b[i, 2]] = 1
        cropped.append(masks[i] * keep)
    inst = Instances(output_size)
    inst.pred_boxes = boxes
    inst.scores = scores
    inst.pred_classes = labels
    inst.pred_masks = torch.stack(cropped) if cropped else masks
    return inst[boxes.nonempty()]


@torch.no_grad()
@_with_torch_linear
def original_inference(model, batched_input, init_img, sample_steps=1, box_renewal=True, ensemble=True, eta=1.0):
    """One image through the original's DDIM sampling (global RNG for noise), ensemble without the last step."""
    images, whwh = model.preprocess_image([batched_input])
    src = model.backbone(images.tensor)
    features = [src[f] for f in model.in_features]
    num_classes, n = model.num_classes, model.num_proposals
    scale, total = model.scale, model.num_timesteps
    times = list(reversed(torch.linspace(-1, total - 1, steps=sample_steps + 1).int().tolist()))
    img = init_img.clone()
    ens = []
    for time, time_next in zip(times[:-1], times[1:]):
        t = torch.full((1,), time, dtype=torch.long)
        x = ((torch.clamp(img, -scale, scale) / scale) + 1) / 2
        x = cxcywh_to_xyxy(x) * whwh[:, None, :]
        cls, coord, ker, mask_feat = head_forward(model.head, features, x, t)
        x_start = xyxy_to_cxcywh(coord[-1] / whwh[:, None, :])
        x_start = torch.clamp((x_start * 2 - 1.0) * scale, -scale, scale)
        pred_noise = (model.sqrt_recip_alphas_cumprod[t].view(1, 1, 1) * img - x_start) / (
            model.sqrt_recipm1_alphas_cumprod[t].view(1, 1, 1)
        )
        if box_renewal:
            keep = torch.sigmoid(cls[-1][0]).max(-1)[0] > 0.5
            num_remain = int(keep.sum())
            pred_noise, x_start, img = pred_noise[:, keep], x_start[:, keep], img[:, keep]
        if time_next < 0:
            img = x_start
            continue
        alpha, alpha_next = model.alphas_cumprod[time], model.alphas_cumprod[time_next]
        sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
        c = (1 - alpha_next - sigma**2).sqrt()
        noise = torch.randn_like(img)
        img = x_start * alpha_next.sqrt() + c * pred_noise + sigma * noise
        if box_renewal:
            img = torch.cat((img, torch.randn(1, n - num_remain, 4)), dim=1)
        if ensemble and sample_steps > 1:
            ens.append(topk_repeated(cls[-1][0], coord[-1][0], ker[-1][0], n, num_classes))
    if ensemble and sample_steps > 1:
        box, scores, labels, kers = (torch.cat(x) for x in zip(*ens))
    else:
        box, scores, labels, kers = topk_repeated(cls[-1][0], coord[-1][0], ker[-1][0], n, num_classes)
    keep = batched_nms(box, scores, labels, 0.5)
    box, scores, labels, kers = box[keep], scores[keep], labels[keep], kers[keep]
    probs = grouped_mask_head(mask_feat, kers).sigmoid()
    h_in, w_in = images.image_sizes[0]
    out_size = (batched_input.get("height", h_in), batched_input.get("width", w_in))
    return postprocess(box, scores, labels, probs, (h_in, w_in), out_size)


# ----------------------------------------------------------------------------------------------------- training


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
