"""Pictures of the denoising: the proposals of every DDIM step, from pure noise to the final masks.

Record the sampler's steps with ``model.sampler.observe`` around an inference call, turn them into frames with
:func:`denoising_frames`, then draw them (:func:`draw_frame`) into a strip (:func:`save_strip`) and an animation
(:func:`save_animation`). ``tools/visualize_denoising.py`` is the command line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.structures import Instances
from PIL import Image, ImageDraw, ImageFont

from .modeling.diffusion import boxes_from_signal
from .modeling.sampler import SamplerStep

__all__ = ["Frame", "denoising_frames", "draw_frame", "noise_boxes", "save_animation", "save_strip", "score_color"]

NOISE_COLOR = (200, 200, 200)  # the boxes of pure noise, before any score
FONT = ImageFont.load_default()


@dataclass
class Frame:
    """One picture of the denoising: boxes (M, 4) xyxy in the original image's pixels and their best class scores.

    ``renewed`` (M,) marks the proposals box renewal replaces with fresh noise after this step; ``scores`` is None
    for the initial noise. The last frame is the model's result: its detections with ``labels`` and ``masks``.
    """

    title: str
    boxes: np.ndarray
    scores: Optional[np.ndarray]
    renewed: np.ndarray
    labels: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = None


def noise_boxes(signal: torch.Tensor, images_whwh: torch.Tensor, scale: float) -> torch.Tensor:
    """The boxes (B, N, 4) abs xyxy that a box signal (B, N, 4) stands for in images of size ``images_whwh`` (B, 4)."""
    return boxes_from_signal(signal, scale) * images_whwh[:, None, :]


def denoising_frames(steps: Sequence[SamplerStep], instances: Instances, height: int, width: int,
                     image: int = 0) -> List[Frame]:
    """The steps + 1 frames of image ``image`` of the batch: the initial noise, each step's predictions but the
    last's (kept and renewed proposals), and the result ``instances`` (in an image of ``height`` x ``width``)."""
    if not steps:
        raise ValueError("no sampler steps were recorded")
    whwh = steps[0].images_whwh[image].float().cpu()
    to_image = torch.tensor([width, height, width, height], dtype=torch.float32) / whwh
    first = steps[0]
    count = len(steps)
    frames = [Frame(f"noise x_T, t = {first.t}", (first.boxes_in[image].float().cpu() * to_image).numpy(), None,
                    np.zeros(first.boxes_in.shape[1], dtype=bool))]
    for s in steps[:-1]:
        renewed = ~s.keep[image].cpu().numpy()
        frames.append(Frame(f"step {s.step + 1}/{count}, t = {s.t} -> {s.t_next}: {int(renewed.sum())} renewed",
                            (s.boxes[image].float().cpu() * to_image).numpy(),
                            s.logits[image].float().sigmoid().amax(-1).cpu().numpy(), renewed))
    last = steps[-1]
    inst = instances.to("cpu")
    masks = inst.pred_masks.numpy().astype(bool) if inst.has("pred_masks") else None
    frames.append(Frame(f"step {count}/{count}, t = {last.t} -> 0: result", inst.pred_boxes.tensor.numpy(),
                        inst.scores.numpy(), np.zeros(len(inst), dtype=bool), inst.pred_classes.numpy(), masks))
    return frames


def score_color(score: Optional[float]) -> Tuple[int, int, int]:
    """A colour for a score in [0, 1]: blue (0), through green and yellow, to red (1); grey for no score."""
    if score is None:
        return NOISE_COLOR
    stops = np.array([[40, 80, 255], [0, 200, 120], [255, 220, 0], [255, 30, 30]], dtype=np.float64)
    pos = float(np.clip(score, 0.0, 1.0)) * (len(stops) - 1)
    i = min(int(pos), len(stops) - 2)
    c = stops[i] + (pos - i) * (stops[i + 1] - stops[i])
    return tuple(int(round(v)) for v in c)


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], color, width: int, dash: int = 4) -> None:
    """A rectangle of dashes (PIL draws only solid ones)."""
    x0, y0, x1, y1 = box
    for (ax, ay, bx, by) in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1), (x0, y1, x0, y0)):
        length = max(abs(bx - ax), abs(by - ay))
        n = max(int(length // dash), 1)
        for k in range(0, n, 2):
            f0, f1 = k / n, min(k + 1, n) / n
            draw.line([(ax + (bx - ax) * f0, ay + (by - ay) * f0), (ax + (bx - ax) * f1, ay + (by - ay) * f1)],
                      fill=color, width=width)


def draw_frame(rgb: np.ndarray, frame: Frame, threshold: float = 0.5, height: int = 320,
               class_names: Optional[Sequence[str]] = None) -> Image.Image:
    """Draw a frame on the image (H, W, 3 RGB uint8), shown ``height`` px high with its title above.

    Proposals: solid if kept, dashed if renewed, coloured by score (drawn low scores first); the result frame draws
    the detections scoring ``threshold`` or more, with their masks.
    """
    zoom = height / rgb.shape[0]
    base = rgb.astype(np.float32)
    if frame.masks is not None:
        for m, score, label in zip(frame.masks, frame.scores, frame.labels):
            if score >= threshold:
                base[m] = 0.45 * base[m] + 0.55 * np.array(score_color(float(score)), dtype=np.float32)
    picture = Image.fromarray(base.clip(0, 255).astype(np.uint8)).resize(
        (max(int(round(rgb.shape[1] * zoom)), 1), height), Image.BILINEAR)
    draw = ImageDraw.Draw(picture)
    scores = frame.scores if frame.scores is not None else np.zeros(len(frame.boxes))
    for i in np.argsort(scores, kind="stable"):
        if frame.masks is not None and scores[i] < threshold:
            continue
        box = [float(v) * zoom for v in frame.boxes[i]]
        box = [min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])]
        color = score_color(None if frame.scores is None else float(scores[i]))
        if frame.renewed[i]:
            _dashed_rectangle(draw, box, color, width=1)
        else:
            draw.rectangle(box, outline=color, width=2 if frame.scores is not None else 1)
        if frame.labels is not None:
            name = class_names[frame.labels[i]] if class_names and frame.labels[i] < len(class_names) \
                else str(int(frame.labels[i]))
            draw.text((box[0] + 2, box[1] + 1), f"{name} {scores[i]:.2f}", fill=(255, 255, 255), font=FONT)
    band = 14 * 2 + 4
    out = Image.new("RGB", (picture.width, picture.height + band), (255, 255, 255))
    out.paste(picture, (0, band))
    text = ImageDraw.Draw(out)
    text.text((3, 2), frame.title, fill=(0, 0, 0), font=FONT)
    legend = "solid: kept, dashed: renewed" if frame.scores is not None and frame.masks is None else (
        f"score >= {threshold:g}, masks" if frame.masks is not None else "pure noise")
    text.text((3, 16), legend, fill=(80, 80, 80), font=FONT)
    _score_bar(text, out.width - 72, 18, 60, 8)
    return out


def _score_bar(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, h: int) -> None:
    """The score colour scale, 0 to 1, left to right."""
    for k in range(width):
        draw.line([(x + k, y), (x + k, y + h)], fill=score_color(k / (width - 1)))
    draw.text((x - 8, y - 2), "0", fill=(80, 80, 80), font=FONT)
    draw.text((x + width + 1, y - 2), "1", fill=(80, 80, 80), font=FONT)


def save_strip(pictures: Sequence[Image.Image], path: str, gap: int = 4) -> None:
    """The frames side by side, left to right, in one PNG."""
    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    strip = Image.new("RGB", (width, max(p.height for p in pictures)), (255, 255, 255))
    x = 0
    for p in pictures:
        strip.paste(p, (x, 0))
        x += p.width + gap
    strip.save(path)


def save_animation(pictures: Sequence[Image.Image], path: str, frame_ms: int = 800, last_ms: int = 2000) -> None:
    """The frames as a looping animation (GIF, or APNG for a .png path), holding the last frame longer."""
    durations = [frame_ms] * (len(pictures) - 1) + [last_ms]
    pictures[0].save(path, save_all=True, append_images=list(pictures[1:]), duration=durations, loop=0)
