"""Shared fixtures: configs built from the project's YAML files, small synthetic datasets, determinism."""
from __future__ import annotations

from pathlib import Path

import pytest

import diffusioninst  # noqa: F401  (compat shims before detectron2)
from detectron2.config import get_cfg

from diffusioninst import add_diffusioninst_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
REFERENCE_STATE_DICT = ROOT / "tests" / "data" / "official_state_dict_r50.txt"


def reference_state_dict_shapes() -> dict:
    """Key -> shape (tuple) of the original release's R50 COCO state_dict, in its order ('#' lines are comments)."""
    shapes = {}
    for line in REFERENCE_STATE_DICT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.rsplit(" ", 1)
            dims = shape.strip("[]")
            shapes[key] = tuple(int(d) for d in dims.split(",")) if dims else ()
    return shapes


def load_cfg(name: str, *opts):
    """A fresh config from configs/<name> with KEY VALUE overrides."""
    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    cfg.merge_from_file(str(CONFIGS / name))
    cfg.merge_from_list([str(o) for o in opts])
    return cfg


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` are skipped, with the reason, where torch sees no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"no CUDA GPU (torch {torch.__version__}); `make gpu-check` runs these on one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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


def register_shapes_at(root: str) -> None:
    """(Re-)register shapes_train / shapes_val from the dataset under ``root``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from diffusioninst.data import register_shapes

    for name in ("shapes_train", "shapes_val"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
    register_shapes(root)


def train_tiny_on_shapes(*opts, iterations: int = 40, check_losses=None):
    """Train the tiny model (plus ``opts``) on 4 fixed shapes_train batches; returns (model, batches, loss history).

    ``check_losses(loss_dict)``, if given, is called on every iteration's losses.
    """
    import torch
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model

    from diffusioninst import DiffusionInstDatasetMapper, build_optimizer

    torch.manual_seed(0)
    cfg = tiny_cfg(*opts, "SOLVER.IMS_PER_BATCH", 4, "SOLVER.BASE_LR", 1e-3, "SOLVER.WARMUP_ITERS", 0,
                   "MODEL.DiffusionInst.NUM_PROPOSALS", 16)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    loader = iter(build_detection_train_loader(cfg, mapper=DiffusionInstDatasetMapper(cfg, is_train=True)))
    batches = [next(loader) for _ in range(4)]
    history = []
    model.train()
    for it in range(iterations):
        losses = model(batches[it % len(batches)])
        if check_losses is not None:
            check_losses(losses)
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(float(total.detach()))
    return model, batches, history
