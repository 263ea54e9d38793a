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
    """A small shapes dataset (generated once per session) registered as shapes_train / shapes_val."""
    from diffusioninst.data import generate_shapes_dataset

    root = tmp_path_factory.mktemp("datasets")
    generate_shapes_dataset(str(root), num_train=16, num_val=4, image_size=128, seed=0)
    return str(root)
