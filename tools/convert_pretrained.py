#!/usr/bin/env python
"""Convert ImageNet backbone weights (torchvision ResNet, official or timm Swin) for ``MODEL.WEIGHTS``.

  tools/convert_pretrained.py [--type {auto,resnet,swin}] [--keep-final-norm] INPUT OUTPUT

OUTPUT ending in ``.pkl`` is a pickle of numpy arrays (like detectron2's ``ImageNetPretrained`` files), any other
name a ``torch.save`` file; both load through ``DetectionCheckpointer`` by name suffix matching. Original
DiffusionInst checkpoints need no conversion. The logic lives in ``diffusioninst.weights``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusioninst  # noqa: E402,F401  (compat shims and registrations come first)
from diffusioninst.errors import UserError, run_tool  # noqa: E402
from diffusioninst.weights import FORMATS, convert_file  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="ImageNet checkpoint (.pth / .pt / .bin / .safetensors / .pkl)")
    parser.add_argument("output", help="converted file; .pkl for numpy arrays, anything else for torch.save")
    parser.add_argument(
        "--type", choices=("auto",) + FORMATS, default="auto", help="input format (default: detect from keys)"
    )
    parser.add_argument(
        "--keep-final-norm",
        action="store_true",
        help="Swin: load the classifier's final LayerNorm into the last stage's output norm (the original "
        "release trains all output norms from scratch, the default)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .pth/.pkl files that hold more than weights (full unpickling, which can run code: trusted "
        "files only)",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    return parser.parse_args(argv)


def _shell_value(value: Any) -> str:
    """A config value as one shell word that detectron2's ``merge_from_list`` parses back to the same value."""
    if isinstance(value, (list, tuple)):
        return shlex.quote(json.dumps(list(value), separators=(",", ":")))
    return shlex.quote(str(value))


def run(argv: list[str] | None = None) -> int:
    """Convert INPUT to OUTPUT and print what was done; bad input raises a UserError (one line, exit status 1)."""
    args = parse_args(argv)
    try:
        converted = convert_file(
            args.input,
            args.output,
            kind=None if args.type == "auto" else args.type,
            keep_final_norm=args.keep_final_norm,
            allow_pickle=args.allow_pickle,
        )
    except FileNotFoundError as e:
        raise UserError(str(e)) from e
    print(
        f"Converted {args.input} ({converted.source_format}): {len(converted.model)} tensors written to "
        f"{args.output}, {len(converted.dropped)} dropped."
    )
    if converted.config:
        options = " ".join(f"{key} {_shell_value(value)}" for key, value in converted.config.items())
        print(f"Use with: MODEL.WEIGHTS {args.output} {options}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``run`` with user errors reported in one line (exit status 1)."""
    return run_tool(run, argv, "convert_pretrained.py")


if __name__ == "__main__":
    sys.exit(main())
