#!/usr/bin/env python
"""Time DiffusionInst inference (ours and the original release's code path) and training; print a table, write JSON.

The logic lives in ``benchmarks``; this is its command line.

  tools/benchmark.py --config-file CFG [--mode inference|train|all] [--batch-size 8] [--warmup 2] [--repeats 5]
                     [--image-size 800x1216 | --shapes] [--impl ours|original|both|onnx] [--json out.json]
                     [--count-ops] [KEY VALUE ...]

Inference: images/s and ms/image at batch 1 and at --batch-size (``model.inference`` in eval mode under no_grad),
after warm-up calls, over N timed calls (median, min/max, IQR), a breakdown of one call (preprocess,
backbone+FPN, mask branch, decoder over all DDIM steps, everything after the decoder) measured by wrapping the model's
own calls with timers in separate, instrumented calls, and peak memory from one more call per case. ``--impl original``
runs the original release's inference as re-stated in ``benchmarks/original_release`` (batch 1 only) on the same
weights and initial boxes. Training: s/iteration (forward, backward, optimizer step from ``diffusioninst.build_optimizer``) and peak memory
(one more iteration);
``--impl original`` trains with the original release's loss computation and optimizer as re-stated in the same file
(``original_training_forward``: per-image noising, matcher loops, losses, stock RoIAlign; ``original_optimizer``) on
the same model and batch. ``--impl onnx`` times this package's PyTorch inference against its ONNX export
(``tools/export_model.py``'s graph) run by onnxruntime with as many threads, on the same image and initial boxes.
Timed calls run as in a long evaluation or training loop: the C allocator keeps what earlier calls freed (with
MODEL.DEVICE cpu and CPU_KEEP_FREED_MEMORY, as tools/train_net.py and tools/demo.py set it up, for both code paths);
each memory call starts from a trimmed heap, so that its peak is its own.
``--count-ops`` times nothing: it counts the kernel-launching ops and host syncs of one call of each case
(``benchmarks/count_ops.py``), what the call would cost a GPU in launches and stalls, on any device.
Weights come from MODEL.WEIGHTS; with MODEL.WEIGHTS "" they are a random init, and the detection counts (hence the
post-processing time) are not those of a trained model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusioninst  # noqa: E402,F401  (compat shims and registrations come first)
from benchmarks import format_report, run_benchmark  # noqa: E402
from benchmarks.count_ops import format_counts, run_count_ops  # noqa: E402
from benchmarks.runs import parse_size  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--mode", choices=("inference", "train", "all"), default="inference")
    parser.add_argument("--impl", choices=("ours", "original", "both", "onnx"), default="ours",
                        help="code path: this package's, the original release's (inference: batch 1), both, or "
                        "onnx: this package's PyTorch path and its ONNX export run by onnxruntime (inference, batch 1)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="inference batch besides batch 1 (always timed); the training batch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls (and as many instrumented calls for the breakdown)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image-size", type=parse_size, default=(800, 1216), metavar="HxW",
                        help="random uint8 images of this size (training: with random boxes and masks)")
    source.add_argument("--shapes", action="store_true",
                        help="real images: shapes_val / shapes_train through DiffusionInstDatasetMapper")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="weights init, inputs and initial boxes")
    parser.add_argument("--json", metavar="FILE", help="write every measurement here")
    parser.add_argument("--count-ops", action="store_true",
                        help="instead of timing: count kernel-launching aten ops and host syncs of one inference call "
                        "(batch 1 and --batch-size) and/or one training iteration at --batch-size "
                        "(benchmarks/count_ops.py; deterministic, device-independent)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark from command-line arguments, print the tables and write the JSON."""
    args = get_parser().parse_args(argv)
    if args.count_ops:
        if args.impl == "onnx" or args.shapes:
            raise SystemExit("--count-ops counts --impl ours, original or both on random inputs (--image-size)")
        results = run_count_ops(args.config_file, args.opts, args.mode, args.impl, args.batch_size, args.image_size,
                                args.seed)
        print(format_counts(results))
    else:
        results = run_benchmark(args.config_file, args.opts, args.mode, args.impl, args.batch_size, args.warmup,
                                args.repeats, args.image_size, args.shapes, args.threads, args.seed)
        print(format_report(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, allow_nan=False)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
