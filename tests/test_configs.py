"""Every YAML in configs/ parses (no unknown keys), says what it is, follows its name, and builds a model on CPU.

The configs are found by glob, so a new config is covered without touching this file. Names follow
``diffinst.<dataset>.<backbone>.<schedule>[.<variant>].yaml``; the facts each name implies (classes, datasets,
schedule, backbone architecture) are checked against the paper (Sec. 4, implementation details) and the original
DiffusionInst/DiffusionDet releases' configs. ``Base-*.yaml`` files are only parsed and built.
"""
from __future__ import annotations

import gc

import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from conftest import CONFIGS, load_cfg, reference_state_dict_shapes
from diffusioninst.modeling.dynamic_mask_head import num_mask_head_params
from diffusioninst.modeling.meta_arch import DiffusionInst

ALL_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
NAMED_CONFIGS = [n for n in ALL_CONFIGS if not n.startswith("Base-")]

# <dataset> token -> (NUM_CLASSES, DATASETS.TRAIN, DATASETS.TEST)
DATASETS = {
    "coco": (80, ("coco_2017_train",), ("coco_2017_val",)),
    "lvis": (1203, ("lvis_v1_train",), ("lvis_v1_val",)),
    "shapes": (4, ("shapes_train",), ("shapes_val",)),
    "shapes-lvis": (4, ("shapes_lvis_train",), ("shapes_lvis_val",)),
}
# <schedule> token -> (MAX_ITER, STEPS) at 16 images per batch. 5x: the original release's 5x configs; 3x: its
# 3x (Base and LVIS configs); 1x: the 5x decay points scaled to 90k (7/9 and 14/15 of the run).
SCHEDULES = {
    "1x": (90000, (70000, 84000)),
    "3x": (270000, (210000, 250000)),
    "5x": (450000, (350000, 420000)),
}
RESNET_DEPTHS = {"res18": 18, "res50": 50, "res101": 101}
# <backbone> token -> (embed dim, blocks per stage, heads per stage); window 7 for both (224 ImageNet-22k weights).
SWINS = {
    "swinbase": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swinlarge": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
SWIN_WINDOW = 7
# <backbone> token -> MODEL.WEIGHTS: detectron2's torchvision R-50; the others are converted files under models/
# with the original release's names (detectron2 hosts no torchvision-style R-101).
PRETRAINED = {
    "res50": "detectron2://ImageNetPretrained/torchvision/R-50.pkl",
    "res101": "models/torchvision-R-101.pkl",
    "swinbase": "models/swin_base_patch4_window7_224_22k.pkl",
    "swinlarge": "models/swin_large_patch4_window7_224_22k.pkl",
}

# Federated loss reads per-class image counts from the training set's metadata; detectron2 v0.6 registers LVIS
# without them, and the project's fallback computes them from the (absent here) annotation file. A stand-in
# lets the model build without LVIS on disk; only the loss weights depend on it, not the architecture.
FAKE_CLASS_IMAGE_COUNT = [{"id": i + 1, "image_count": 1 + i % 7} for i in range(1203)]


def _cfg(name: str):
    return load_cfg(name, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "")


def _tokens(name: str) -> list:
    parts = name[: -len(".yaml")].split(".")
    assert parts[0] == "diffinst" and len(parts) >= 4, (
        f"{name}: configs are named diffinst.<dataset>.<backbone>.<schedule>[.<variant>].yaml"
    )
    return parts[1:]


def test_configs_are_found():
    assert "Base-DiffusionInst.yaml" in ALL_CONFIGS
    for name in (
        "diffinst.coco.res50.1x.yaml", "diffinst.coco.res50.3x.yaml", "diffinst.coco.res50.5x.yaml",
        "diffinst.coco.res101.5x.yaml", "diffinst.coco.swinbase.5x.yaml", "diffinst.coco.swinlarge.5x.yaml",
        "diffinst.coco.res50.5x.test-dev.yaml", "diffinst.lvis.res50.3x.yaml", "diffinst.lvis.res101.3x.yaml",
        "diffinst.lvis.swinbase.3x.yaml", "diffinst.shapes.res18.cpu.yaml", "diffinst.shapes.res18.demo.yaml",
    ):
        assert name in ALL_CONFIGS


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_parses_with_a_header_comment(name):
    cfg = _cfg(name)  # merge_from_file raises KeyError on any key the project does not define
    assert cfg.MODEL.META_ARCHITECTURE == "DiffusionInst"
    first = (CONFIGS / name).read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 20, f"{name} must open with a comment saying what it is"


@pytest.mark.parametrize("name", NAMED_CONFIGS)
def test_name_matches_contents(name):
    dataset, backbone, schedule, *variant = _tokens(name)
    cfg = _cfg(name)
    d = cfg.MODEL.DiffusionInst

    assert dataset in DATASETS, f"unknown dataset token {dataset!r}"
    num_classes, train, test = DATASETS[dataset]
    assert d.NUM_CLASSES == num_classes
    assert tuple(cfg.DATASETS.TRAIN) == train
    if variant == ["test-dev"]:
        assert dataset == "coco"
        assert tuple(cfg.DATASETS.TEST) == ("coco_2017_test-dev",)
        assert d.NUM_PROPOSALS == 100  # the paper's test-dev setting: 100 proposals
    else:
        assert not variant, f"unknown variant {variant}"
        assert tuple(cfg.DATASETS.TEST) == test
    if not dataset.startswith("shapes"):  # the synthetic dataset registers itself at run time
        for ds in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
            assert ds in DatasetCatalog.list(), f"{ds} is not a detectron2 builtin dataset name"

    weights = load_cfg(name).MODEL.WEIGHTS  # _cfg blanks it; the file's own value
    if not dataset.startswith("shapes"):
        assert weights == PRETRAINED[backbone], "ImageNet weights as the original release names them"
    if backbone in RESNET_DEPTHS:
        assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
        assert cfg.MODEL.RESNETS.DEPTH == RESNET_DEPTHS[backbone]
        assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False  # torchvision-style weights
    else:
        assert backbone in SWINS, f"unknown backbone token {backbone!r}"
        assert cfg.MODEL.BACKBONE.NAME in ("build_swin_fpn_backbone", "build_swintransformer_fpn_backbone")
        assert cfg.MODEL.SWIN.SIZE == {"swinbase": "B-22k", "swinlarge": "L-22k"}[backbone]
        assert list(cfg.MODEL.FPN.IN_FEATURES) == ["swin0", "swin1", "swin2", "swin3"]

    if dataset.startswith("shapes"):
        return  # the CPU configs are tuned separately; nothing below applies
    assert d.NUM_PROPOSALS in (100, 500)
    assert SCHEDULES[schedule] == (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS))
    # The paper's optimisation settings (Sec. 4), shared by every full-size config (at 16 images per batch).
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == pytest.approx(2.5e-5)
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.WEIGHT_DECAY == pytest.approx(1e-4)
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert cfg.SOLVER.WARMUP_ITERS == 1000 and cfg.SOLVER.WARMUP_FACTOR == pytest.approx(0.01)
    assert cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute_range"
    assert tuple(cfg.INPUT.CROP.SIZE) == (384, 600)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32)) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    if dataset == "lvis":
        assert d.USE_FED_LOSS
        assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
        assert cfg.DATALOADER.REPEAT_THRESHOLD == pytest.approx(0.001)
        assert cfg.TEST.DETECTIONS_PER_IMAGE == 300  # LVIS AP uses up to 300 detections per image
    else:
        assert not d.USE_FED_LOSS
        assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
        assert cfg.TEST.DETECTIONS_PER_IMAGE == 100  # COCO AP uses up to 100


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_builds_model(name):
    cfg = _cfg(name)
    d = cfg.MODEL.DiffusionInst
    if d.USE_FED_LOSS:
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        if not hasattr(meta, "class_image_count"):
            meta.class_image_count = FAKE_CLASS_IMAGE_COUNT[: d.NUM_CLASSES]
    model = build_model(cfg)
    try:
        assert isinstance(model, DiffusionInst)
        assert next(model.parameters()).device == torch.device("cpu")
        stages = model.head.head_series
        assert len(stages) == d.NUM_HEADS
        assert all(s.class_logits.out_features == d.NUM_CLASSES for s in stages)
        layout = (d.MASK_DIM, d.MASK_HEAD_CHANNELS, d.MASK_HEAD_LAYERS)
        assert all(s.controller.out_features == num_mask_head_params(*layout) for s in stages)
        outputs = model.backbone.output_shape()
        for f in (*cfg.MODEL.ROI_HEADS.IN_FEATURES, *d.MASK_IN_FEATURES):
            assert f in outputs, f"backbone outputs {sorted(outputs)} lack {f}"
            assert outputs[f].channels == d.HIDDEN_DIM
        assert model.num_proposals == d.NUM_PROPOSALS

        tokens = name[: -len(".yaml")].split(".")
        backbone = tokens[2] if tokens[0] == "diffinst" else None
        if backbone in SWINS:
            embed, depths, heads = SWINS[backbone]
            bottom_up = model.backbone.bottom_up
            assert tuple(bottom_up.patch_embed.proj.weight.shape) == (embed, 3, 4, 4)
            assert [len(layer.blocks) for layer in bottom_up.layers] == list(depths)
            for layer, h in zip(bottom_up.layers, heads):
                for block in layer.blocks:
                    table = block.attn.relative_position_bias_table
                    assert tuple(table.shape) == ((2 * SWIN_WINDOW - 1) ** 2, h)
            assert [outputs[f"p{i}"].stride for i in (2, 3, 4, 5)] == [4, 8, 16, 32]
        elif backbone in ("res50", "res101"):
            res4 = model.backbone.bottom_up.res4
            assert len(res4) == {"res50": 6, "res101": 23}[backbone]

        if tokens[:3] == ["diffinst", "coco", "res50"]:
            # Same architecture as the original release's R50 checkpoint: identical keys, shapes and size
            # (the number of proposals does not change the state dict).
            ref = reference_state_dict_shapes()
            ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            assert sum(torch.Size(s).numel() for s in ours.values()) == sum(torch.Size(s).numel() for s in ref.values())
            assert ours == ref
    finally:
        del model
        gc.collect()
