#!/usr/bin/env python
"""Run DiffusionInst on images and save visualisations: ``tools/demo.py --config-file CFG --input IMG... --output DIR``."""
import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusioninst  # noqa: E402,F401  (compat shims and registrations come first)
import cv2  # noqa: E402
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

from diffusioninst import add_diffusioninst_config  # noqa: E402
from diffusioninst.data import register_datasets_from_cfg  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, help="images, folders or glob patterns")
    parser.add_argument("--output", required=True, help="output folder (or a file name for a single input)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return parser


def expand_inputs(patterns):
    """Files named by each pattern: a folder gives its images, a glob its matches, a path itself."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            paths += sorted(os.path.join(pattern, f) for f in os.listdir(pattern) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif any(c in pattern for c in "*?["):
            paths += sorted(glob.glob(pattern))
        else:
            paths.append(pattern)
    return paths


def main() -> int:
    args = get_parser().parse_args()
    setup_logger(name="diffusioninst")
    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    register_datasets_from_cfg(cfg)
    cfg.freeze()
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    paths = expand_inputs(args.input)
    single_file = len(paths) == 1 and os.path.splitext(args.output)[1].lower() in IMAGE_EXTENSIONS
    if not single_file:
        os.makedirs(args.output, exist_ok=True)
    failures = 0
    for path in paths:
        try:
            image = read_image(path, format="BGR")
        except Exception as exc:  # unreadable input: report, go on with the rest
            print(f"[demo] cannot read {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        start = time.perf_counter()
        instances = predictor(image)["instances"].to("cpu")
        elapsed = time.perf_counter() - start
        instances = instances[instances.scores >= args.confidence_threshold]
        print(f"[demo] {path}: {len(instances)} instances in {elapsed:.2f}s")
        vis = Visualizer(image[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE).draw_instance_predictions(instances)
        out = args.output if single_file else os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        if os.path.abspath(out) == os.path.abspath(path):
            raise SystemExit(f"[demo] refusing to overwrite the input {path}; choose another --output")
        cv2.imwrite(out, vis.get_image()[:, :, ::-1])
    if failures:
        print(f"[demo] {failures} of {len(paths)} inputs could not be read", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    with torch.no_grad():
        sys.exit(main())
