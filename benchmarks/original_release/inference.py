"""The original release's inference path, re-stated: its tensor layouts and algorithms (sequence-first attention
inputs, (1, B*N, d) proposal features, the mask branch recomputed at every step, filters repeated for every class
before top-k, the mask head as a grouped convolution over a repeated feature map, a per-mask crop loop, batch size 1)
on the weights of a ``DiffusionInst`` model. Written for this project from the method's description.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from detectron2.layers import batched_nms
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, Instances
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
    # detectron2's own multi-level pooling (our head's pooler subclasses it with a sync-free path for GPUs)
    roi_features = ROIPooler.forward(pooler, features, [Boxes(bboxes[b]) for b in range(n_img)])
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
