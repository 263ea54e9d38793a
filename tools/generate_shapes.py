#!/usr/bin/env python
"""Generate the synthetic shapes dataset (``<root>/shapes``), e.g. ahead of a training run.

Training does not need this step (``shapes_train``/``shapes_val`` are generated on first use); use it to
pick other sizes or seeds, or ``--force`` to regenerate.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys

from diffusioninst.data.shapes import generate_shapes_dataset
from diffusioninst.errors import UserError, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; the defaults match what ``DatasetCatalog.get("shapes_train")`` generates."""
    defaults = {k: p.default for k, p in inspect.signature(generate_shapes_dataset).parameters.items()}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        default=os.getenv("DETECTRON2_DATASETS", "datasets"),
        help="datasets root; the dataset goes to <root>/shapes (default: $DETECTRON2_DATASETS or datasets)",
    )
    parser.add_argument("--num-train", type=int, default=defaults["num_train"], help="training images")
    parser.add_argument("--num-val", type=int, default=defaults["num_val"], help="validation images")
    parser.add_argument("--image-size", type=int, default=defaults["image_size"], help="image side, pixels")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="same seed, same bytes")
    parser.add_argument("--force", action="store_true", help="regenerate and replace an existing dataset")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    """Generate the dataset and print where it is; exit status 1 if a different one is already there."""
    args = parse_args(argv)
    root = os.path.expanduser(args.root)
    for path in (root, os.path.join(root, "shapes")):
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"--root: {path} is a file, not a directory; choose another --root")
    try:
        path = generate_shapes_dataset(
            os.path.expanduser(args.root),
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            seed=args.seed,
            overwrite=args.force,
            progress=lambda line: print(f"[shapes] {line}", flush=True),
        )
    except FileExistsError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"Shapes dataset ({args.num_train} train / {args.num_val} val images) at {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``run`` with user errors reported in one line (exit status 1)."""
    return run_tool(run, argv, "generate_shapes.py")


if __name__ == "__main__":
    sys.exit(main())
