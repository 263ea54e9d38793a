"""diffusioninst.plots and tools/plot_metrics.py: the pictures `make demo` writes after training."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from diffusioninst.data.shapes import generate_shapes_dataset
from diffusioninst.plots import plot_predictions, plot_training_curves, read_metrics
from tools import plot_metrics


def _write_metrics(path, iterations=40, eval_at=(19, 39)):
    with open(path, "w") as f:
        for it in range(0, iterations, 5):
            terms = {k: 2.0 / (it + 1) for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_masks")}
            f.write(json.dumps({"iteration": it, "total_loss": sum(terms.values()), **terms}) + "\n")
            if it + 4 in eval_at:
                f.write(json.dumps({"iteration": it + 4, "bbox/AP": 10.0 + it, "segm/AP": float("nan")}) + "\n")
        f.write('{"iteration": 41, "total_lo')  # a line cut short by a kill


def test_read_metrics_skips_a_truncated_line(tmp_path):
    path = tmp_path / "metrics.json"
    _write_metrics(path)
    records = read_metrics(str(path))
    assert len(records) == 8 + 2 and all("iteration" in r for r in records)


def test_training_curves_png(tmp_path):
    path = tmp_path / "metrics.json"
    _write_metrics(path)
    out = plot_training_curves(str(path), str(tmp_path / "curves.png"))
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (288, 800, 3)  # 10 x 3.6 inches at 80 dpi
    assert image.std() > 10  # something is drawn, not a blank canvas


def _shapes(tmp_path):
    generate_shapes_dataset(str(tmp_path), num_train=1, num_val=5, image_size=64)
    gt_json = tmp_path / "shapes" / "annotations" / "instances_val.json"
    return json.loads(gt_json.read_text()), str(gt_json), str(tmp_path / "shapes" / "val")


def test_predictions_png_draws_ground_truth_beside_predictions_above_the_threshold(tmp_path):
    gt, gt_json, image_root = _shapes(tmp_path)
    results = [dict(a, score=0.9) for a in gt["annotations"]]
    results_json = tmp_path / "results.json"
    results_json.write_text(json.dumps(results))
    with_images = sorted({a["image_id"] for a in gt["annotations"]})

    shown = plot_predictions(gt_json, image_root, str(results_json), str(tmp_path / "shown.png"), 0.5, num_images=4)
    hidden = plot_predictions(gt_json, image_root, str(results_json), str(tmp_path / "hidden.png"), 0.95,
                              num_images=4)
    a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (shown, hidden))
    rows = -(-min(4, len(with_images)) // 2)
    assert a.shape == b.shape == (200 * rows, 800, 3)  # two (ground truth, predictions) pairs per row
    assert Image.open(shown).mode == "P" and os.path.getsize(shown) < 200_000  # a palette PNG, small to commit
    # The predictions panels differ (drawn above 0.5, none above 0.95); the ground-truth panels only by the palette.
    left, right = (slice(20, 200), slice(0, 200)), (slice(20, 200), slice(200, 400))
    gt_change, pred_change = np.abs(a[left] - b[left]).mean(), np.abs(a[right] - b[right]).mean()
    assert pred_change > 3 * gt_change, (gt_change, pred_change)


def test_plot_metrics_tool(tmp_path, capsys):
    _write_metrics(tmp_path / "metrics.json")
    assert plot_metrics.main([str(tmp_path)]) == 0
    assert (tmp_path / "training_curves.png").is_file()
    assert "[plot]" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot_metrics.main([str(empty)]) == 1
    err = capsys.readouterr().err
    assert "plot_metrics.py: error:" in err and "metrics.json not found" in err
