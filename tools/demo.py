#!/usr/bin/env python
"""Run DiffusionInst on images, a video file or a webcam and draw masks, boxes, labels and scores.

  tools/demo.py --config-file CFG --input IMG_OR_DIR_OR_GLOB... --output DIR_OR_FILE.png
  tools/demo.py --config-file CFG --video-input VIDEO --output DIR_OR_FILE.mp4
  tools/demo.py --config-file CFG --webcam [--output DIR_OR_FILE.mp4]
  tools/demo.py --onnx model.onnx --input ... --output ...   (an export of tools/export_model.py, by onnxruntime)

The PyTorch model and its ONNX export draw the same sampling noise (``--seed``), hence the same detections.

Unreadable inputs are reported and skipped; the exit status is 1 if any input could not be processed. Mistakes in
the command line (config, weights, --output) stop it with one line (exit status 1; --debug shows the traceback).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusioninst  # noqa: E402,F401  (compat shims and registrations come first)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data.catalog import Metadata  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

from diffusioninst import get_diffusioninst_cfg, load_weights  # noqa: E402
from diffusioninst.data import register_datasets_from_cfg  # noqa: E402
from diffusioninst.runtime import configure_runtime  # noqa: E402
from diffusioninst.errors import UserError, run_tool  # noqa: E402
from diffusioninst.predictor import DiffusionInstPredictor  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v")
VIDEO_FOURCC = "mp4v"  # available in opencv-python(-headless) wheels; written into an .mp4 container
WINDOW = "DiffusionInst"


def get_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", metavar="FILE", help="the config (not needed with --onnx)")
    parser.add_argument("--onnx", metavar="FILE", help="run this ONNX export with onnxruntime instead of PyTorch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (same for every image)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="images, folders or glob patterns")
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--webcam", action="store_true", help="camera 0")
    parser.add_argument("--output", help="output folder, or a file name (image: one input; video: the video file)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="run even with MODEL.WEIGHTS empty or not matching the model (random predictions)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return parser


def report(message: str) -> None:
    """Print a problem with one input to stderr."""
    print(f"[demo] {message}", file=sys.stderr)


def file_key(path: str) -> str:
    """A path normalised for comparing files (links resolved; the file need not exist)."""
    return os.path.normcase(os.path.realpath(path))


def expand_inputs(patterns: list[str]) -> tuple[list[str], int]:
    """Files named by each pattern (a folder gives its images, a glob its matches) and how many matched nothing."""
    paths, empty = [], 0
    for pattern in patterns:
        if os.path.isdir(pattern):
            names = (f for f in os.listdir(pattern) if f.lower().endswith(IMAGE_EXTENSIONS))
            found = sorted(os.path.join(pattern, f) for f in names)
        elif any(c in pattern for c in "*?["):
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        else:
            found = [pattern]
        if not found:
            report(f"no images found for {pattern!r}")
            empty += 1
        paths += found
    return paths, empty


def image_output_paths(paths: list[str], output: str) -> list[str | None]:
    """The PNG to write for each input: ``output`` itself for one input with an image name, else ``output/<stem>.png``.

    An output that would overwrite an input (or an earlier output) is reported and given as None.
    """
    single = os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS
    if single and len(paths) > 1:
        raise UserError(f"--output {output} is a file name but there are {len(paths)} inputs; give a folder")
    if not single and os.path.isfile(output):
        raise UserError(f"--output {output} is a file, not a folder; give a folder (or an image file name for one input)")
    taken = {file_key(p) for p in paths}  # inputs, then outputs already assigned
    outs: list[str | None] = []
    for path in paths:
        out = output if single else os.path.join(output, os.path.splitext(os.path.basename(path))[0] + ".png")
        if file_key(out) in taken:
            report(f"skipping {path}: its output {out} is an input file or another input's output (never overwritten)")
            out = None
        else:
            taken.add(file_key(out))
        outs.append(out)
    return outs


def video_output_path(output: str, source: str) -> str:
    """``output`` if it names a video file, else ``output/<source stem>.mp4``; never a path equal to the source."""
    if os.path.splitext(output)[1].lower() in VIDEO_EXTENSIONS:
        out = output
    else:
        out = os.path.join(output, os.path.splitext(os.path.basename(source))[0] + ".mp4")
    if file_key(out) == file_key(source):
        raise UserError(f"refusing to overwrite the input {source}; choose another --output")
    return out


def has_display() -> bool:
    """Whether cv2.imshow can open a window (an OpenCV built with a GUI backend, and a display on X11/Wayland)."""
    gui = next((line for line in cv2.getBuildInformation().splitlines() if line.strip().startswith("GUI:")), "")
    if not gui or gui.split(":", 1)[1].strip().upper() == "NONE":
        return False
    return not sys.platform.startswith("linux") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def build_predictor(args: argparse.Namespace) -> tuple[Any, Metadata]:
    """The predictor (PyTorch, or onnxruntime with --onnx) and the metadata (class names, colours) to draw with."""
    if args.onnx:
        from diffusioninst.export import OnnxPredictor

        if not os.path.isfile(args.onnx):
            raise UserError(f"--onnx {args.onnx}: no such file")
        predictor = OnnxPredictor(args.onnx, seed=args.seed)
        names, colors = predictor.metadata["class_names"], predictor.metadata.get("class_colors")
        return predictor, Metadata(**({"thing_classes": names} if names else {}),
                                   **({"thing_colors": [tuple(c) for c in colors]} if colors else {}))
    if not args.config_file:
        raise UserError("--config-file is required (or --onnx with an exported model)")
    cfg = get_diffusioninst_cfg(args.config_file, args.opts)  # errors name the file, the key and the closest key
    register_datasets_from_cfg(cfg)
    weights = cfg.MODEL.WEIGHTS
    cfg.MODEL.WEIGHTS = ""  # the predictor builds the model; the weights are loaded below with clear errors
    cfg.freeze()
    configure_runtime(cfg)
    predictor = DiffusionInstPredictor(cfg, seed=args.seed)
    if not weights and args.allow_random_weights:
        report("MODEL.WEIGHTS is empty: the model is randomly initialised (--allow-random-weights)")
    load_weights(predictor.model, weights, use_ema=cfg.MODEL_EMA.ENABLED, allow_pickle=cfg.MODEL.WEIGHTS_ALLOW_PICKLE,
                 require_complete=not args.allow_random_weights)
    return predictor, MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")


def annotate(
    predictor: Any, metadata: Metadata, bgr: np.ndarray, threshold: float
) -> tuple[np.ndarray, int, float]:
    """Predict on one BGR image; return the drawing (BGR), the number of instances kept and the model time."""
    start = time.perf_counter()
    instances = predictor(bgr)["instances"].to("cpu")
    elapsed = time.perf_counter() - start
    instances = instances[instances.scores >= threshold]
    np.random.seed(0)  # the Visualizer draws each instance's colour at random: the same colours for the same input
    vis = Visualizer(bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE).draw_instance_predictions(instances)
    return vis.get_image()[:, :, ::-1], len(instances), elapsed


def run_images(args: argparse.Namespace) -> int:
    """Draw predictions for every input image; return the number of inputs that failed."""
    paths, failures = expand_inputs(args.input)
    outs = image_output_paths(paths, args.output)
    failures += sum(out is None for out in outs)
    jobs = [(path, out) for path, out in zip(paths, outs) if out is not None]
    predictor, metadata = build_predictor(args) if jobs else (None, None)
    for index, (path, out) in enumerate(jobs, 1):
        try:
            image = read_image(path, format="BGR")
        except Exception as exc:  # unreadable input: report, go on with the rest
            report(f"cannot read {path}: {exc}")
            failures += 1
            continue
        drawn, count, elapsed = annotate(predictor, metadata, image, args.confidence_threshold)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        if not cv2.imwrite(out, drawn):
            report(f"cannot write {out}")
            failures += 1
            continue
        print(f"[demo] {index}/{len(jobs)} {path}: {count} instances in {elapsed:.2f}s -> {out}")
    if failures:
        report(f"{failures} input(s) could not be processed")
    return failures


def open_writer(path: str, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """A video writer for ``path`` (folder created); a UserError if OpenCV cannot open it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*VIDEO_FOURCC), fps, size)
    if not writer.isOpened():
        raise UserError(f"cannot open a {VIDEO_FOURCC} video writer for {path}")
    return writer


def run_stream(args: argparse.Namespace, capture: cv2.VideoCapture, name: str, out: str | None, show: bool) -> int:
    """Draw predictions on every frame of ``capture``, writing them to ``out`` and/or a window; return 0."""
    predictor, metadata = build_predictor(args)
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else 30.0
    writer, frames, instances, seconds = None, 0, 0, 0.0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            drawn, count, elapsed = annotate(predictor, metadata, frame, args.confidence_threshold)
            frames, instances, seconds = frames + 1, instances + count, seconds + elapsed
            if out is not None:
                if writer is None:
                    writer = open_writer(out, fps, (drawn.shape[1], drawn.shape[0]))
                writer.write(drawn)
            if show:
                cv2.imshow(WINDOW, drawn)
                if cv2.waitKey(1) & 0xFF in (27, ord("q")):  # Esc or q stops
                    break
    except KeyboardInterrupt:
        pass
    finally:
        capture.release()
        if writer is not None:
            writer.release()
        if show:
            cv2.destroyAllWindows()
    if frames == 0:
        report(f"no frame could be read from {name}")
        return 1
    print(
        f"[demo] {name}: {frames} frames, {instances} instances ({instances / frames:.1f} per frame), "
        f"{seconds / frames:.2f}s per frame" + (f" -> {out}" if out else "")
    )
    return 0


def run(argv: list[str] | None = None) -> int:
    """The demo; returns the exit status (user errors raise)."""
    args = get_parser().parse_args(argv)
    setup_logger(name="diffusioninst")
    if args.input is not None:
        if not args.output:
            raise UserError("--output is required with --input")
        return 1 if run_images(args) else 0
    name = args.video_input if args.video_input is not None else "webcam"
    show = has_display() and (args.webcam or not args.output)
    if not show and not args.output:
        raise UserError("no display available (e.g. opencv-python-headless): give --output to write a video")
    out = video_output_path(args.output, name) if args.output else None
    capture = cv2.VideoCapture(args.video_input if args.video_input is not None else 0)
    if not capture.isOpened():
        report(f"cannot open {name}")
        return 1
    return run_stream(args, capture, name, out, show)


def main(argv: list[str] | None = None) -> int:
    """The command line: ``run`` without autograd, user errors reported in one line (exit status 1)."""
    with torch.no_grad():
        return run_tool(run, argv, "demo.py")


if __name__ == "__main__":
    sys.exit(main())
