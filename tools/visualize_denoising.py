#!/usr/bin/env python
"""Draw the denoising of DiffusionInst: the proposals at every DDIM step, from pure noise to the final masks.

  tools/visualize_denoising.py --config-file CFG --input IMG_OR_DIR... --steps N --output DIR --opts MODEL.WEIGHTS W

For each image, writes DIR/<name>_denoising.png (a strip of the steps + 1 frames, each titled with its step and
time t) and DIR/<name>_denoising.gif (the same frames as an animation; --apng writes .png animations). Frame 0 is the
initial noise; each later frame is one step's predictions, coloured by score, solid if kept and dashed if box renewal
replaces them; the last is the model's result with its masks. The frames come from the sampler's own loop
(``model.sampler.observe``) in the very inference call that gives the result, with ``tools/demo.py``'s noise
(--seed): the same detections as the demo.

Unreadable images are reported and skipped (exit status 1); mistakes in the command line stop it with one line.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusioninst  # noqa: E402,F401  (compat shims and registrations come first)
import torch  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from diffusioninst.denoising import denoising_frames, draw_frame, save_animation, save_strip  # noqa: E402
from diffusioninst.errors import UserError, run_tool  # noqa: E402
from diffusioninst.modeling.sampler import SamplerStep  # noqa: E402
from tools.demo import build_predictor, expand_inputs, report  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", metavar="FILE", required=True, help="the config")
    parser.add_argument("--input", nargs="+", required=True, help="images, folders or glob patterns")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the config's MODEL.DiffusionInst.SAMPLE_STEP)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (tools/demo.py's)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="draw results scoring this or more")
    parser.add_argument("--height", type=int, default=320, help="height of each frame in pixels")
    parser.add_argument("--apng", action="store_true", help="write animated PNGs instead of GIFs")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="run even with MODEL.WEIGHTS empty or not matching the model (random predictions)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    parser.set_defaults(onnx=None)  # build_predictor's PyTorch path
    return parser


def visualize(predictor, class_names, path: str, out_dir: str, args: argparse.Namespace) -> str:
    """Write the strip and the animation of one image; returns a line describing them."""
    bgr = read_image(path, format="BGR")
    steps: list[SamplerStep] = []
    with predictor.model.sampler.observe(steps.append):
        instances = predictor(bgr)["instances"]
    frames = denoising_frames(steps, instances, *bgr.shape[:2])
    rgb = bgr[:, :, ::-1].copy()
    pictures = [draw_frame(rgb, f, args.confidence_threshold, args.height, class_names) for f in frames]
    stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_denoising")
    save_strip(pictures, stem + ".png")
    animation = stem + ("_animated.png" if args.apng else ".gif")
    save_animation(pictures, animation)
    shown = int((instances.scores >= args.confidence_threshold).sum())
    return f"{len(frames)} frames, {shown} results drawn -> {stem}.png, {animation}"


def run(argv: list[str] | None = None) -> int:
    """The tool; returns the exit status (user errors raise)."""
    args = get_parser().parse_args(argv)
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps {args.steps}: the number of DDIM steps must be 1 or more")
        args.opts = [*args.opts, "MODEL.DiffusionInst.SAMPLE_STEP", str(args.steps)]
    if args.height < 16:
        raise UserError(f"--height {args.height}: give a frame height of 16 pixels or more")
    if os.path.isfile(args.output):
        raise UserError(f"--output {args.output} is a file; give a folder")
    setup_logger(name="diffusioninst")
    paths, failures = expand_inputs(args.input)
    if not paths:
        raise UserError(f"--input {' '.join(args.input)}: no images found")
    predictor, metadata = build_predictor(args)
    class_names = metadata.get("thing_classes", None)
    os.makedirs(args.output, exist_ok=True)
    for index, path in enumerate(paths, 1):
        try:
            line = visualize(predictor, class_names, path, args.output, args)
        except OSError as exc:  # unreadable image (PIL's UnidentifiedImageError is an OSError) or unwritable output
            report(f"cannot process {path}: {exc}")
            failures += 1
            continue
        print(f"[visualize_denoising] {index}/{len(paths)} {path}: {line}")
    if failures:
        report(f"{failures} input(s) could not be processed")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``run`` without autograd, user errors reported in one line (exit status 1)."""
    with torch.no_grad():
        return run_tool(run, argv, "visualize_denoising.py")


if __name__ == "__main__":
    sys.exit(main())
