"""Pictures of a run: training curves from ``OUTPUT_DIR/metrics.json`` (losses and evaluation AP against iteration)
and a grid of validation images with the evaluation's predictions beside the ground truth."""
from __future__ import annotations

import io
import json
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["plot_predictions", "plot_training_curves", "read_metrics"]

LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "loss_masks")  # the last decoder stage's terms


def read_metrics(path: str) -> List[Dict[str, float]]:
    """The records of a detectron2 ``metrics.json`` (one JSON object per line; unreadable lines are skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
    return records


def plot_training_curves(metrics_path: str, out_path: str, title: str = "") -> str:
    """Total loss and each loss term of the last decoder stage against iteration, and the evaluation AP points
    (box and mask AP), as a PNG at ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    losses: Dict[str, List[tuple]] = defaultdict(list)
    aps: Dict[str, List[tuple]] = defaultdict(list)
    for r in records:
        for key in ("total_loss", *LOSS_TERMS):
            if key in r:
                losses[key].append((r["iteration"], r[key]))
        for key in ("bbox/AP", "segm/AP"):
            if isinstance(r.get(key), (int, float)) and np.isfinite(r[key]):
                aps[key].append((r["iteration"], r[key]))
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, points in losses.items():
        its, values = zip(*points)
        ax_loss.plot(its, values, label=key, linewidth=2 if key == "total_loss" else 1)
    ax_loss.set(xlabel="iteration", ylabel="loss (weighted)", yscale="log", title="training losses")
    ax_loss.legend(fontsize=8)
    for key, label, offset in (("bbox/AP", "box AP", (4, 4)), ("segm/AP", "mask AP", (4, -12))):
        if aps[key]:
            its, values = zip(*aps[key])
            ax_ap.plot(its, values, "o-", label=label)
            ax_ap.annotate(f"{values[-1]:.1f}", (its[-1], values[-1]), textcoords="offset points", xytext=offset)
    last = max((r["iteration"] for r in records if "iteration" in r), default=1)
    ax_ap.set(xlabel="iteration", ylabel="AP", title="evaluation", xlim=(0, last * 1.05), ylim=(0, 100))
    ax_ap.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_small_png(fig, out_path)
    plt.close(fig)
    return out_path


def _save_small_png(fig, out_path: str, colors: int = 256) -> None:
    """Save a figure as a 256-colour palette PNG (for the photo grid a sixth of the RGB file's size; small enough to
    commit to the repository, as README's pictures are)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=colors).save(out_path, optimize=True)


def plot_predictions(gt_json: str, image_root: str, results_json: str, out_path: str, threshold: float = 0.5,
                     num_images: int = 8, image_ids: Optional[Sequence[int]] = None) -> str:
    """A grid of ``num_images`` validation images: ground truth on the left, the evaluation's predictions (its
    ``coco_instances_results.json``) with score >= ``threshold`` on the right, as a PNG at ``out_path``."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pycocotools.mask as mask_util
    from detectron2.data.catalog import Metadata
    from detectron2.utils.visualizer import ColorMode, Visualizer

    with open(gt_json) as f:
        gt = json.load(f)
    with open(results_json) as f:
        results = json.load(f)
    cats = {c["id"]: c["name"] for c in gt["categories"]}
    names = [cats[k] for k in sorted(cats)]
    index = {k: i for i, k in enumerate(sorted(cats))}
    metadata = Metadata(thing_classes=names)
    by_image: Dict[int, Dict[str, list]] = defaultdict(lambda: {"gt": [], "pred": []})
    for a in gt["annotations"]:
        by_image[a["image_id"]]["gt"].append(a)
    for r in results:
        if r["score"] >= threshold:
            by_image[r["image_id"]]["pred"].append(r)
    images = {img["id"]: img for img in gt["images"]}
    ids = list(image_ids) if image_ids is not None else [i for i in sorted(images) if by_image[i]["gt"]][:num_images]
    pairs = 2  # (ground truth, predictions) pairs per row
    rows = max(1, -(-len(ids) // pairs))
    fig, axes = plt.subplots(rows, 2 * pairs, figsize=(5 * pairs, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for n, image_id in enumerate(ids):
        row, first = divmod(n, pairs)
        img = images[image_id]
        rgb = cv2.imread(os.path.join(image_root, img["file_name"]))[:, :, ::-1]
        h, w = rgb.shape[:2]
        for col, (kind, anns) in enumerate((("ground truth", by_image[image_id]["gt"]),
                                            ("predictions", by_image[image_id]["pred"]))):
            masks = [mask_util.decode(_rle(a["segmentation"], h, w)) for a in anns]
            np.random.seed(0)  # the Visualizer's colours are random: the same for both columns
            vis = Visualizer(rgb, metadata, instance_mode=ColorMode.IMAGE).overlay_instances(
                masks=masks or None, boxes=[[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                             a["bbox"][1] + a["bbox"][3]] for a in anns] or None,
                labels=[f"{names[index[a['category_id']]]}" + (f" {a['score']:.0%}" if "score" in a else "")
                        for a in anns] or None)
            ax = axes[row, 2 * first + col]
            ax.imshow(vis.get_image())
            if row == 0:
                ax.set_title(kind if kind == "ground truth" else f"predictions (score >= {threshold})", fontsize=9)
    fig.tight_layout()
    _save_small_png(fig, out_path)
    plt.close(fig)
    return out_path


def _rle(segmentation, height: int, width: int) -> dict:
    """A COCO segmentation (polygons, RLE with string or list counts) as compressed RLE."""
    import pycocotools.mask as mask_util

    if isinstance(segmentation, list):
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_util.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
