#!/usr/bin/env python
"""Export a trained DiffusionInst to ONNX and check onnxruntime's outputs against PyTorch's.

  tools/export_model.py --config-file CFG --output DIR [--sample-image IMG] [KEY VALUE ...]

Writes DIR/model.onnx (opset 17, dynamic image height and width). Inputs: ``image`` float32 (1, 3, H, W), pixel
values 0-255 in the config's INPUT.FORMAT order, already resized by the test-time rule recorded in the file's
metadata; ``init_boxes`` float32 (1, N, 4), the initial noise; with SAMPLE_STEP > 1 also ``step_noise`` float32
(SAMPLE_STEP - 1, 2, 1, N, 4), the DDIM and renewal noise of the later steps. Outputs: ``boxes`` (K, 4) xyxy in input
pixels, ``scores`` (K,), ``classes`` (K,) int64, ``masks`` (K, H, W) bool. The check runs both on the sample image
(default: the first image of DATASETS.TEST) with the same noise; the exit status is 1 if it fails.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusioninst  # noqa: E402,F401  (compat shims and registrations come first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from diffusioninst import get_diffusioninst_cfg, load_weights  # noqa: E402
from diffusioninst.data import read_image, register_datasets_from_cfg  # noqa: E402
from diffusioninst.errors import UserError, run_tool  # noqa: E402


def sample_image(cfg, path: Optional[str]) -> torch.Tensor:
    """(1, 3, H, W) float32: the image at ``path`` (default: the first image of DATASETS.TEST), resized by the test
    rule."""
    given = path is not None
    if path is None:
        try:
            path = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"]
        except (IndexError, KeyError, OSError, UserError) as exc:
            raise UserError(f"no --sample-image given and DATASETS.TEST has no image to use ({exc}); pass "
                            "--sample-image IMG") from exc
    try:
        image = read_image(path, format=cfg.INPUT.FORMAT)
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for files that are not images)
        what = "--sample-image" if given else "the first image of DATASETS.TEST"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what} {path} is not a readable image ({type(exc).__name__}: {reason})") from exc
    resized = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST).get_transform(
        image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)), dtype=torch.float32)[None]


def run(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for model.onnx")
    parser.add_argument("--sample-image", metavar="IMG", help="image to trace and check on")
    parser.add_argument("--allow-random-weights", action="store_true", help="export even with MODEL.WEIGHTS empty")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    args = parser.parse_args(argv)
    from diffusioninst.export import check_onnx, export_onnx
    from diffusioninst.export.onnx import BOX_TOL, MASK_IOU_MIN, SCORE_TOL

    cfg = get_diffusioninst_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    register_datasets_from_cfg(cfg)
    if os.path.isfile(args.output):
        raise UserError(f"--output {args.output} is a file, not a folder")
    model = build_model(cfg).eval()
    load_weights(model, cfg.MODEL.WEIGHTS, use_ema=cfg.MODEL_EMA.ENABLED, allow_pickle=cfg.MODEL.WEIGHTS_ALLOW_PICKLE,
                 require_complete=not args.allow_random_weights)
    image = sample_image(cfg, args.sample_image)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "model.onnx")
    dataset = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
    meta = export_onnx(model, cfg, path, image, dataset.get("thing_classes", []) if dataset else [],
                       dataset.get("thing_colors", []) if dataset else [])
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MB; {meta['sample_steps']} sampling step(s), "
          f"{meta['num_proposals']} proposals)")
    report = check_onnx(path, model, image)
    ties = f", {report['unpaired_ties']} unpaired but tied in score" if report["unpaired_ties"] else ""
    missing = f", {report['unpaired_not_tied']} UNPAIRED" if report["unpaired_not_tied"] else ""
    print(f"check on a {image.shape[-1]}x{image.shape[-2]} image, onnxruntime vs PyTorch (same noise): "
          f"{report['detections']} vs {report['detections_pytorch']} detections, {report['paired']} paired by class "
          f"and box{ties}{missing}; max box difference {report['max_box_diff_px']:.2e} px (<= {BOX_TOL:g}), max "
          f"score difference {report['max_score_diff']:.2e} (<= {SCORE_TOL:g}), min mask IoU "
          f"{report['min_mask_iou']:.4f} (>= {MASK_IOU_MIN:g}): {'passed' if report['passed'] else 'FAILED'}")
    return 0 if report["passed"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (a user error is printed as one line)."""
    return run_tool(run, argv, "export_model.py")


if __name__ == "__main__":
    sys.exit(main())
