#!/usr/bin/env python
"""Dataset loading at full size: this project's checked loading against plain detectron2's, in one run.

  tools/benchmark_data.py --root DIR [--generate] [--datasets coco_2017_train lvis_v1_train] [--repeats 1]
                          [--ranks N] [--json out.json] [KEY VALUE ...]

``--generate`` first writes synthetic annotation files of the real sizes of COCO 2017 and LVIS v1 under DIR
(``benchmarks/synthetic_datasets.py``: the real counts of images, annotations and categories, realistic polygons, a
few RLE crowd regions; image files are hard links of 8 small JPEGs), laid out as detectron2's builtin datasets.
Each measurement runs in a fresh process with ``DETECTRON2_DATASETS=DIR``: plain detectron2's
``get_detection_dataset_dicts(names, filter_empty=True)``, then ours (``register_datasets_from_cfg(cfg)`` first, all
checks on unless KEY VALUE overrides say otherwise). Prints wall time, peak RSS, records, the ratios and whether
both sides returned the same records.

``--ranks N`` measures memory across the N processes of one machine instead: the training set built as each trainer
builds it, by plain detectron2 in one process against ours in N processes that share one copy (PSS and RSS increases
of every rank, peak RSS, and whether every rank read the same records).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.data_loading import (  # noqa: E402
    format_data_report, format_ranks_report, measure_ranks, run_data_benchmark,
)
from benchmarks.synthetic_datasets import SPLITS  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, metavar="DIR", help="the datasets root ($DETECTRON2_DATASETS)")
    parser.add_argument("--generate", action="store_true", help="write the synthetic files first (kept if present)")
    parser.add_argument("--datasets", nargs="+", default=["coco_2017_train", "lvis_v1_train"], choices=sorted(SPLITS))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side (the fastest is reported)")
    parser.add_argument("--ranks", type=int, metavar="N", help="memory of N processes sharing one copy instead")
    parser.add_argument("--json", metavar="FILE", help="write every measurement here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for ours, as KEY VALUE pairs")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[Any]:
    """Generate (optionally), measure both sides, print the table, write the JSON."""
    args = get_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"benchmark_data.py: --repeats must be at least 1, got {args.repeats}")
    if args.ranks is not None and args.ranks < 2:
        raise SystemExit(f"benchmark_data.py: --ranks must be at least 2, got {args.ranks}")
    if args.generate:
        import diffusioninst  # noqa: F401  (detectron2 compat: the generator takes the category lists from it)
        from benchmarks.synthetic_datasets import generate

        generate(args.root, args.datasets + [n for n in ("coco_2017_val",) if n not in args.datasets])
    elif not os.path.isdir(args.root):
        raise SystemExit(f"benchmark_data.py: --root {args.root} is not a directory (use --generate to write it)")
    if args.ranks:
        rows = []
        for name in args.datasets:
            single, shared = (measure_ranks(impl, name, args.root, ranks, args.opts)
                              for impl, ranks in (("plain", 1), ("ours", args.ranks)))
            rows.append({"dataset": name, "plain": single, "ours": shared})
            print(format_ranks_report(name, single, shared))
    else:
        rows = run_data_benchmark(args.root, args.datasets, args.repeats, args.opts)
        print(format_data_report(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"\nwrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
