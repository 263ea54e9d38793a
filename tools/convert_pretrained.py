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
from diffusioninst.weights import FORMATS, WeightsFormatError, convert_file  # noqa: E402


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
        help="read torch.save files that hold more than tensors (full unpickling: trusted files only)",
    )
    return parser.parse_args(argv)


def _shell_value(value: Any) -> str:
    """A config value as one shell word that detectron2's ``merge_from_list`` parses back to the same value."""
    if isinstance(value, (list, tuple)):
        return shlex.quote(json.dumps(list(value), separators=(",", ":")))
    return shlex.quote(str(value))


def main(argv: list[str] | None = None) -> int:
    """Convert INPUT to OUTPUT and print what was done; exit status 1 with a message on bad input."""
    args = parse_args(argv)
    try:
        converted = convert_file(
            args.input,
            args.output,
            kind=None if args.type == "auto" else args.type,
            keep_final_norm=args.keep_final_norm,
            allow_pickle=args.allow_pickle,
        )
    except (FileNotFoundError, WeightsFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"Converted {args.input} ({converted.source_format}): {len(converted.model)} tensors written to "
        f"{args.output}, {len(converted.dropped)} dropped."
    )
    if converted.config:
        options = " ".join(f"{key} {_shell_value(value)}" for key, value in converted.config.items())
        print(f"Use with: MODEL.WEIGHTS {args.output} {options}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
