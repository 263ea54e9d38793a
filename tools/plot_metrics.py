#!/usr/bin/env python
"""Pictures of a run: ``tools/plot_metrics.py OUTPUT_DIR [--threshold 0.5]``.

Writes OUTPUT_DIR/training_curves.png (total loss and each loss term against iteration, with the evaluation AP
points) from OUTPUT_DIR/metrics.json, and, when the run evaluated a dataset with COCO-format files,
OUTPUT_DIR/predictions.png: validation images with the evaluation's predictions beside the ground truth.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusioninst  # noqa: E402,F401  (compat shims and registrations come first)
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from diffusioninst import get_diffusioninst_cfg  # noqa: E402
from diffusioninst.data import register_datasets_from_cfg  # noqa: E402
from diffusioninst.errors import UserError, run_tool  # noqa: E402
from diffusioninst.plots import plot_predictions, plot_training_curves  # noqa: E402


def run(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a run's OUTPUT_DIR (with metrics.json)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score of the predictions drawn")
    parser.add_argument("--images", type=int, default=8, help="validation images in predictions.png")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    args = parser.parse_args(argv)
    metrics = os.path.join(args.output_dir, "metrics.json")
    if not os.path.isfile(metrics):
        raise UserError(f"{metrics} not found: OUTPUT_DIR is the folder a training run wrote")
    print(f"[plot] {plot_training_curves(metrics, os.path.join(args.output_dir, 'training_curves.png'))}")
    config = os.path.join(args.output_dir, "config.yaml")
    if not os.path.isfile(config):
        return 0
    cfg = get_diffusioninst_cfg(config)
    register_datasets_from_cfg(cfg)
    for name in cfg.DATASETS.TEST[:1]:
        results = os.path.join(args.output_dir, "inference", name, "coco_instances_results.json")
        meta = MetadataCatalog.get(name)
        if os.path.isfile(results) and meta.get("evaluator_type") == "coco":
            DatasetCatalog.get(name)  # makes the files (the shapes dataset is generated on first use)
            out = os.path.join(args.output_dir, "predictions.png")
            print(f"[plot] {plot_predictions(meta.json_file, meta.image_root, results, out, args.threshold, args.images)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (a user error is printed as one line)."""
    return run_tool(run, argv, "plot_metrics.py")


if __name__ == "__main__":
    sys.exit(main())
