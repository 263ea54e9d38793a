"""Shared fixtures: configs built from the project's YAML files, small synthetic datasets, determinism."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import diffusioninst  # noqa: F401  (compat shims before detectron2)
from detectron2.config import get_cfg

from diffusioninst import add_diffusioninst_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
REFERENCE_STATE_DICT = ROOT.parent / "shared" / "reference" / "official_state_dict_r50.txt"


def load_cfg(name: str, *opts):
    """A fresh config from configs/<name> with KEY VALUE overrides."""
    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    cfg.merge_from_file(str(CONFIGS / name))
    cfg.merge_from_list([str(o) for o in opts])
    return cfg


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> str:
    """Root of a small shapes dataset generated once per session (pass it to register or DETECTRON2_DATASETS)."""
    from diffusioninst.data import generate_shapes_dataset

    root = tmp_path_factory.mktemp("datasets")
    generate_shapes_dataset(str(root), num_train=16, num_val=4, image_size=128, seed=0)
    return str(root)


TINY_OPTS = (
    "MODEL.DEVICE", "cpu",
    "MODEL.FPN.OUT_CHANNELS", 64,
    "MODEL.DiffusionInst.HIDDEN_DIM", 64,
    "MODEL.DiffusionInst.DIM_FEEDFORWARD", 128,
    "MODEL.DiffusionInst.DIM_DYNAMIC", 16,
    "MODEL.DiffusionInst.NHEADS", 4,
    "MODEL.DiffusionInst.NUM_PROPOSALS", 20,
    "MODEL.DiffusionInst.NUM_HEADS", 2,
    "MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 16,
    "MODEL.DiffusionInst.MASK_BRANCH_NUM_CONVS", 1,
    "INPUT.MIN_SIZE_TRAIN", "(96, 112)",
    "INPUT.MAX_SIZE_TRAIN", 160,
    "INPUT.MIN_SIZE_TEST", 96,
    "INPUT.MAX_SIZE_TEST", 160,
    "DATALOADER.NUM_WORKERS", 0,
)


def tiny_cfg(*opts):
    """The shapes config shrunk further so a model builds and runs in well under a second."""
    return load_cfg("diffinst.shapes.res18.cpu.yaml", *TINY_OPTS, *opts)
