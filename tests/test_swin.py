"""Swin (+ FPN) backbone: shapes, registry/config, official / timm checkpoint conversion and loading."""
from __future__ import annotations

import pickle
from typing import Dict, Sequence, Tuple

import diffusioninst  # noqa: F401  (compat shims before detectron2)

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

from diffusioninst.modeling.backbone import (
    SWIN_SIZES,
    SwinBackbone,
    add_swin_config,
    convert_official_swin_state_dict,
    convert_timm_swin_state_dict,
)

# A narrow Swin with every feature of the full ones (shifted blocks, 4 stages, patch merging), fast on CPU.
TINY_ARCH = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)


def _official_relative_position_index(window: int) -> torch.Tensor:
    """(window**2, window**2) index into the relative position bias table, as the official code builds it."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def _official_shapes(
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    window: int = 7,
    num_classes: int = 21841,
    image_size: int = 224,
) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of a Microsoft ImageNet Swin checkpoint (``swin_*_patch4_window7_224_22k.pth["model"]``)."""
    shapes: Dict[str, Tuple[int, ...]] = {
        "patch_embed.proj.weight": (embed_dim, 3, 4, 4),
        "patch_embed.proj.bias": (embed_dim,),
        "patch_embed.norm.weight": (embed_dim,),
        "patch_embed.norm.bias": (embed_dim,),
    }
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dim * 2**i
        grid = image_size // 4 // 2**i
        for j in range(depth):
            block = f"layers.{i}.blocks.{j}."
            shapes.update({
                block + "norm1.weight": (dim,),
                block + "norm1.bias": (dim,),
                block + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, heads),
                block + "attn.relative_position_index": (window**2, window**2),
                block + "attn.qkv.weight": (3 * dim, dim),
                block + "attn.qkv.bias": (3 * dim,),
                block + "attn.proj.weight": (dim, dim),
                block + "attn.proj.bias": (dim,),
                block + "norm2.weight": (dim,),
                block + "norm2.bias": (dim,),
                block + "mlp.fc1.weight": (4 * dim, dim),
                block + "mlp.fc1.bias": (4 * dim,),
                block + "mlp.fc2.weight": (dim, 4 * dim),
                block + "mlp.fc2.bias": (dim,),
            })
            if j % 2 == 1 and grid > window:
                shapes[block + "attn_mask"] = ((grid // window) ** 2, window**2, window**2)
        if i < len(depths) - 1:
            shapes[f"layers.{i}.downsample.norm.weight"] = (4 * dim,)
            shapes[f"layers.{i}.downsample.norm.bias"] = (4 * dim,)
            shapes[f"layers.{i}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
    last = embed_dim * 2 ** (len(depths) - 1)
    shapes.update({"norm.weight": (last,), "norm.bias": (last,), "head.weight": (num_classes, last)})
    shapes["head.bias"] = (num_classes,)
    return shapes


def _to_official(model: SwinBackbone, num_classes: int = 10) -> Dict[str, torch.Tensor]:
    """Our weights written as an official checkpoint: plus index/mask buffers, a classifier and a final norm."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if name.endswith(".attn"):
            window = module.window_size[0]
            state[f"{name}.relative_position_index"] = _official_relative_position_index(window)
            if name.endswith(("1.attn", "3.attn")):
                state[name[: -len(".attn")] + ".attn_mask"] = torch.zeros(4, window**2, window**2)
    last = model.num_features[-1]
    state.update({"norm.weight": torch.rand(last), "norm.bias": torch.rand(last)})
    state.update({"head.weight": torch.rand(num_classes, last), "head.bias": torch.rand(num_classes)})
    return state


def _perturb(model: nn.Module) -> nn.Module:
    """Give every parameter (LayerNorm affines included) non-default random values."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _swin_cfg(size: str = "T"):
    cfg = get_cfg()
    add_swin_config(cfg)
    cfg.MODEL.SWIN.SIZE = size
    cfg.MODEL.BACKBONE.NAME = "build_swin_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["swin0", "swin1", "swin2", "swin3"]
    return cfg


@pytest.fixture(scope="module")
def swin_t() -> SwinBackbone:
    torch.manual_seed(0)
    return SwinBackbone(**SWIN_SIZES["T"]).eval()


@pytest.fixture(scope="module")
def swin_fpn() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(_swin_cfg("T")).eval()


@pytest.mark.parametrize("size", [(224, 320), (256, 384), (64, 96), (96, 64)])
def test_swin_t_output_names_strides_channels(swin_t: SwinBackbone, size: Tuple[int, int]) -> None:
    specs = swin_t.output_shape()
    assert list(specs) == ["swin0", "swin1", "swin2", "swin3"]
    assert [s.stride for s in specs.values()] == [4, 8, 16, 32]
    assert [s.channels for s in specs.values()] == [96, 192, 384, 768]
    assert swin_t.size_divisibility == 32

    with torch.no_grad():
        features = swin_t(torch.randn(2, 3, *size))
    assert list(features) == list(specs)
    for name, feature in features.items():
        stride = specs[name].stride
        assert feature.shape == (2, specs[name].channels, size[0] // stride, size[1] // stride)
        assert torch.isfinite(feature).all()


def test_out_feature_subset_and_names() -> None:
    model = SwinBackbone(**TINY_ARCH, out_indices=("swin1", 3))
    assert model._out_features == ["swin1", "swin3"]
    assert not hasattr(model, "norm0") and hasattr(model, "norm3")
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 128))
    assert {k: tuple(v.shape) for k, v in features.items()} == {"swin1": (1, 64, 8, 16), "swin3": (1, 256, 2, 4)}
    with pytest.raises(ValueError):
        SwinBackbone(**TINY_ARCH, out_indices=(4,))


def test_config_defaults_and_drop_path() -> None:
    cfg = get_cfg()
    add_swin_config(cfg)
    assert cfg.MODEL.SWIN.SIZE == "B"
    assert cfg.MODEL.SWIN.USE_CHECKPOINT is False
    assert tuple(cfg.MODEL.SWIN.OUT_FEATURES) == (0, 1, 2, 3)
    assert cfg.MODEL.SWIN.DROP_PATH_RATE is None
    cfg.merge_from_list(["MODEL.SWIN.DROP_PATH_RATE", "0.05", "MODEL.SWIN.OUT_FEATURES", "[1, 2, 3]"])
    assert cfg.MODEL.SWIN.DROP_PATH_RATE == 0.05
    assert [SWIN_SIZES[s]["drop_path_rate"] for s in "TSBL"] == [0.2, 0.2, 0.3, 0.3]
    for name in ("build_swin_backbone", "build_swin_fpn_backbone", "build_swintransformer_fpn_backbone"):
        assert name in BACKBONE_REGISTRY


def test_fpn_build_from_cfg(swin_fpn: nn.Module) -> None:
    specs = swin_fpn.output_shape()
    assert list(specs) == ["p2", "p3", "p4", "p5", "p6"]
    assert all(s.channels == 256 for s in specs.values())
    assert [s.stride for s in specs.values()] == [4, 8, 16, 32, 64]
    assert swin_fpn.size_divisibility == 32
    assert isinstance(swin_fpn.bottom_up, SwinBackbone)
    last_block = swin_fpn.bottom_up.layers[-1].blocks[-1]
    assert last_block.drop_path2.drop_prob == pytest.approx(0.2)

    with torch.no_grad():
        features = swin_fpn(torch.randn(1, 3, 128, 192))
    for name, feature in features.items():
        assert feature.shape == (1, 256, 128 // specs[name].stride, 192 // specs[name].stride)


def test_official_key_mapping_swin_b() -> None:
    arch = SWIN_SIZES["B"]
    with torch.device("meta"):
        model = SwinBackbone(**arch)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = {
        k: torch.empty(shape, device="meta")
        for k, shape in _official_shapes(arch["embed_dim"], arch["depths"], arch["num_heads"]).items()
    }
    assert "layers.0.blocks.1.attn_mask" in official and "layers.0.downsample.reduction.weight" in official

    converted = convert_official_swin_state_dict({"model": official})
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: s for k, s in ours.items() if not k.startswith(("norm0.", "norm1.", "norm2.", "norm3."))
    }
    with_norm = convert_official_swin_state_dict(official, keep_final_norm=True)
    assert set(with_norm) - set(converted) == {"norm3.weight", "norm3.bias"}

    nested = {"backbone.bottom_up." + k: v for k, v in official.items()}
    prefixed = convert_official_swin_state_dict(nested, prefix="backbone.bottom_up.")
    assert set(prefixed) == {"backbone.bottom_up." + k for k in converted}


def test_official_round_trip_identical_outputs() -> None:
    torch.manual_seed(0)
    source = _perturb(SwinBackbone(**TINY_ARCH)).eval()
    official = _to_official(source)
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        expected = source(x)

    for load in ("converter", "hook"):
        target = SwinBackbone(**TINY_ARCH).eval()
        state = convert_official_swin_state_dict(official) if load == "converter" else official
        result = target.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        with torch.no_grad():
            actual = target(x)
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)


def test_detection_checkpointer_loads_original_release_and_imagenet_pkl(swin_fpn: nn.Module, tmp_path) -> None:
    torch.manual_seed(1)
    source = _perturb(SwinBackbone(**SWIN_SIZES["T"]))
    official = _to_official(source, num_classes=5)
    detector = nn.Module()
    detector.backbone = swin_fpn

    release = {"backbone.bottom_up." + k: v for k, v in official.items() if not k.startswith(("head.", "norm."))}
    release.update({"backbone." + k: v for k, v in swin_fpn.state_dict().items() if not k.startswith("bottom_up.")})
    incompatible = DetectionCheckpointer(detector)._load_model({"model": release})
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    for key, value in source.state_dict().items():
        assert torch.equal(swin_fpn.bottom_up.state_dict()[key], value), key

    # Official ImageNet weights converted to a detectron2 .pkl by name only (detectron2 matches them by suffix).
    torch.manual_seed(2)
    imagenet = _to_official(_perturb(SwinBackbone(**SWIN_SIZES["T"])), num_classes=5)
    path = tmp_path / "swin_tiny_patch4_window7_224_22k.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": imagenet, "__author__": "third_party", "matching_heuristics": True}, f)
    DetectionCheckpointer(detector).load(str(path))
    loaded = swin_fpn.bottom_up.state_dict()
    for key, value in loaded.items():
        if not key.startswith("norm"):
            assert torch.equal(value, imagenet[key]), key


def test_timm_checkpoint_conversion_matches_timm_forward(swin_t: SwinBackbone) -> None:
    # always_partition keeps the shifted windows of the 7x7 last stage, as the official detection code does.
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, always_partition=True)
    reference = _perturb(reference).eval()
    timm_state = reference.state_dict()
    converted = convert_timm_swin_state_dict(timm_state, keep_final_norm=True)
    assert "layers.3.downsample.norm.weight" not in converted and "head.fc.weight" not in converted
    torch.testing.assert_close(
        converted["layers.0.downsample.reduction.weight"], timm_state["layers.1.downsample.reduction.weight"]
    )

    # Converted explicitly (final norm kept as norm3) or by the load hook (final norm dropped).
    hooked_missing = {"norm0", "norm1", "norm2", "norm3"}
    for state, missing in ((converted, {"norm0", "norm1", "norm2"}), (timm_state, hooked_missing)):
        result = swin_t.load_state_dict(state, strict=False)
        assert not result.unexpected_keys
        assert {k.rsplit(".", 1)[0] for k in result.missing_keys} == missing

    swin_t.load_state_dict(converted, strict=False)
    for i in range(3):
        getattr(swin_t, f"norm{i}").reset_parameters()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = swin_t(x)
        _, intermediates = reference.forward_intermediates(x, norm=True)
    for i, feature in enumerate(intermediates):
        if i < 3:
            feature = F.layer_norm(feature.permute(0, 2, 3, 1), feature.shape[1:2]).permute(0, 3, 1, 2)
        torch.testing.assert_close(ours[f"swin{i}"], feature, rtol=1e-4, atol=1e-4)


def _official_block_reference(block: nn.Module, x: torch.Tensor, shift: int) -> torch.Tensor:
    """Official detection semantics of one block on (1, H, W, C), as dense attention over the padded grid.

    The grid is padded to whole windows at the bottom/right, *then* rolled by -shift; a token attends to the
    tokens of its window that lie in the same band of the rolled grid (others get -100), and to no other window.
    """
    _, height, width, channels = x.shape
    window = block.window_size[0]
    padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
    y = F.pad(block.norm1(x), (0, 0, 0, padded_w - width, 0, padded_h - height))
    y = torch.roll(y, (-shift, -shift), (1, 2)).reshape(-1, channels)

    rows, cols = torch.meshgrid(torch.arange(padded_h), torch.arange(padded_w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    same_window = ((rows[:, None] // window) == (rows[None] // window)) & (
        (cols[:, None] // window) == (cols[None] // window)
    )
    band_h = (rows >= padded_h - window).long() + (rows >= padded_h - shift).long() if shift else rows * 0
    band_w = (cols >= padded_w - window).long() + (cols >= padded_w - shift).long() if shift else cols * 0
    region = band_h * 3 + band_w
    rel = (rows[:, None] % window - rows[None] % window + window - 1) * (2 * window - 1) + (
        cols[:, None] % window - cols[None] % window + window - 1
    )

    attn = block.attn
    heads = attn.num_heads
    q, k, v = attn.qkv(y).reshape(-1, 3, heads, channels // heads).permute(1, 2, 0, 3)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    logits = logits + attn.relative_position_bias_table[rel].permute(2, 0, 1)
    logits = logits - 100.0 * (region[:, None] != region[None]).float()
    logits = logits.masked_fill(~same_window, float("-inf"))
    out = attn.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, channels))
    out = torch.roll(out.reshape(1, padded_h, padded_w, channels), (shift, shift), (1, 2))[:, :height, :width]
    x = x + out
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("grid", [(24, 40), (7, 7), (2, 3)])
def test_blocks_follow_official_windowing(grid: Tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = _perturb(SwinBackbone(**TINY_ARCH)).eval()
    blocks = model.layers[0].blocks
    x = torch.randn(1, *grid, TINY_ARCH["embed_dim"])
    with torch.no_grad():
        expected = _official_block_reference(blocks[1], _official_block_reference(blocks[0], x, 0), 3)
        actual = model._forward_blocks(blocks, x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_forward_backward_with_and_without_checkpointing() -> None:
    torch.manual_seed(0)
    model = SwinBackbone(**TINY_ARCH, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 64, 96)
    grads = []
    for use_checkpoint in (False, True):
        model.use_checkpoint = use_checkpoint
        model.zero_grad()
        sum(f.square().mean() for f in model(x).values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert all(g is not None and torch.isfinite(g).all() for g in grads[-1].values())
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
