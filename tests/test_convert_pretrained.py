"""ImageNet backbone conversion (``diffusioninst.weights``, ``tools/convert_pretrained.py``) and checkpoint loading.

The checks load converted files the way training does (``MODEL.WEIGHTS`` through ``DetectionCheckpointer``) into
full DiffusionInst models and compare each ``backbone.bottom_up.*`` tensor with the source tensor it must come
from. Constant-initialised source tensors (norm affines, biases, BN statistics) are perturbed, and the shared
Swin model is reset to a sentinel before each load, so equal values cannot arise from matching initialisations.
"""
from __future__ import annotations

import pickle
import re
import shlex
from typing import Dict, Optional

import diffusioninst  # noqa: F401  (compat shims before detectron2)

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import TINY_OPTS, load_cfg, tiny_cfg
from diffusioninst.weights import (
    WeightsFormatError,
    convert_file,
    convert_pretrained,
    convert_torchvision_resnet,
    detect_format,
    load_weights_file,
    save_converted,
)

BOTTOM_UP = "backbone.bottom_up."
SWIN_T_OPTS = (
    "MODEL.BACKBONE.NAME", "build_swin_fpn_backbone",
    "MODEL.SWIN.SIZE", "T",
    "MODEL.FPN.IN_FEATURES", '["swin0", "swin1", "swin2", "swin3"]',
)


def _tool():
    """``tools/convert_pretrained.py``, whose ``main(argv)`` is the command line."""
    from tools import convert_pretrained

    return convert_pretrained


def _perturbed_state(model: nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """``model``'s state dict with random offsets on every 1-d float tensor.

    Norm affines, biases and BN statistics (the 1-d tensors) start as ones / zeros in source and target alike,
    so equal values would prove nothing; conv / linear weights and Swin's bias tables are random already and
    differ from the target's own initialisation. They are left as they are, which keeps this cheap.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point() and value.dim() <= 1:
            noise = torch.randn(value.shape, generator=generator)
            # Keep running variances positive, so the weights still describe a sensible network.
            value = value + (0.1 * noise.abs() if key.endswith("running_var") else 0.05 * noise)
        state[key] = value
    return state


def _load_like_training(model: nn.Module, path: str):
    """``DetectionCheckpointer(model).load(path)`` (what ``MODEL.WEIGHTS`` does); returns its incompatible keys."""
    checkpointer = DetectionCheckpointer(model)
    found = []
    load_model = checkpointer._load_model

    def recording(checkpoint):
        result = load_model(checkpoint)
        found.append(result)
        return result

    checkpointer._load_model = recording
    checkpointer.load(path)
    assert len(found) == 1, "the checkpointer did not load model weights"
    return found[0]


def _assert_bottom_up_filled(
    model: nn.Module, expected: Dict[str, torch.Tensor], untouched: Optional[Dict[str, torch.Tensor]] = None
) -> None:
    """Every bottom-up tensor equals ``expected[name]`` or, for names in ``untouched``, that (initial) value."""
    untouched = untouched or {}
    loaded = {k[len(BOTTOM_UP):]: v for k, v in model.state_dict().items() if k.startswith(BOTTOM_UP)}
    assert loaded, "the model has no backbone.bottom_up"
    assert set(loaded) == set(expected) | set(untouched), (
        f"not covered: {sorted(set(loaded) - set(expected) - set(untouched))[:8]}, "
        f"extra: {sorted((set(expected) | set(untouched)) - set(loaded))[:8]}"
    )
    wrong = [k for k, v in expected.items() if not torch.equal(loaded[k], v.to(loaded[k].dtype))]
    assert not wrong, f"{len(wrong)} tensors differ from the source, e.g. {wrong[:5]}"
    changed = [k for k, v in untouched.items() if not torch.equal(loaded[k], v)]
    assert not changed, f"tensors without a source were overwritten: {changed[:5]}"


# --------------------------------------------------------------------------------------------------------------
# torchvision ResNet -> detectron2 ResNet
# --------------------------------------------------------------------------------------------------------------


def _d2_resnet_name(torchvision_name: str) -> str:
    """detectron2 name of a torchvision ResNet tensor, by plain string substitution (independent of the module)."""
    name = torchvision_name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    name = re.sub(r"\bbn(\d)\.", r"conv\1.norm.", name)
    for i in range(1, 5):
        if name.startswith(f"layer{i}."):
            return f"res{i + 1}." + name[len(f"layer{i}."):]
    return "stem." + name


def _expected_resnet(torchvision_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {
        _d2_resnet_name(k): v
        for k, v in torchvision_state.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Dict[str, object]:
    """A randomly initialised, perturbed torchvision ResNet-50 saved as a plain state dict."""
    torch.manual_seed(0)
    source = torchvision.models.resnet50(weights=None).eval()
    state = _perturbed_state(source, seed=1)
    source.load_state_dict(state)
    path = tmp_path_factory.mktemp("resnet50") / "resnet50-imagenet.pth"
    torch.save(state, path)
    return {"path": path, "state": state, "module": source}


def test_base_config_matches_torchvision_resnets() -> None:
    """The conversion relies on the base config describing torchvision's network, not the MSRA one."""
    cfg = load_cfg("Base-DiffusionInst.yaml")
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False  # torchvision strides in the 3x3 conv
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN"
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]  # ImageNet mean * 255, RGB order
    assert cfg.MODEL.WEIGHTS.endswith("torchvision/R-50.pkl")


def test_resnet50_cli_pkl_fills_every_bottom_up_tensor(resnet50_file, tmp_path, capsys) -> None:
    output = tmp_path / "R-50.pkl"
    assert _tool().main([str(resnet50_file["path"]), str(output)]) == 0
    printed = capsys.readouterr().out
    assert "torchvision-resnet" in printed and "MODEL.RESNETS.DEPTH 50" in printed

    with open(output, "rb") as f:
        written = pickle.load(f)
    assert written["__author__"] == "torchvision" and written["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in written["model"].values())
    assert "stem.conv1.norm.running_var" in written["model"] and "res2.0.shortcut.norm.bias" in written["model"]
    assert not any(k.startswith("fc.") or "num_batches_tracked" in k for k in written["model"])

    cfg = load_cfg("Base-DiffusionInst.yaml", *TINY_OPTS, "MODEL.WEIGHTS", str(output))
    model = build_model(cfg).eval()
    incompatible = _load_like_training(model, cfg.MODEL.WEIGHTS)
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    assert not [k for k in incompatible.missing_keys if k.startswith(BOTTOM_UP)]
    _assert_bottom_up_filled(model, _expected_resnet(resnet50_file["state"]))
    assert len(written["model"]) == len([k for k in model.state_dict() if k.startswith(BOTTOM_UP)]) == 265

    # Same function, not just same numbers: stride in the 3x3 conv, frozen BN in eval = torchvision's eval BN.
    bottom_up = model.backbone.bottom_up
    assert bottom_up.res3[0].conv1.stride == (1, 1) and bottom_up.res3[0].conv2.stride == (2, 2)
    tv = resnet50_file["module"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = bottom_up(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        expected = {}
        for i, layer in enumerate((tv.layer1, tv.layer2, tv.layer3, tv.layer4)):
            y = layer(y)
            expected[f"res{i + 2}"] = y
    for name, feature in expected.items():
        torch.testing.assert_close(ours[name], feature, rtol=1e-4, atol=1e-4)


def test_resnet101_pth_key_coverage(tmp_path) -> None:
    torch.manual_seed(0)
    state = _perturbed_state(torchvision.models.resnet101(weights=None), seed=2)
    converted = convert_pretrained(state, source="resnet101.pth")
    assert converted.config["MODEL.RESNETS.DEPTH"] == 101
    assert sorted(converted.dropped) == sorted(k for k in state if k.startswith("fc.") or "num_batches" in k)
    output = tmp_path / "R-101.pth"
    save_converted(converted, str(output))

    cfg = load_cfg("Base-DiffusionInst.yaml", *TINY_OPTS, "MODEL.RESNETS.DEPTH", 101, "MODEL.WEIGHTS", str(output))
    model = build_model(cfg)
    incompatible = _load_like_training(model, cfg.MODEL.WEIGHTS)  # a torch.save file, read with weights_only
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    _assert_bottom_up_filled(model, _expected_resnet(state))
    assert len(model.backbone.bottom_up.res4) == 23


def test_resnet18_into_the_shapes_config(tmp_path) -> None:
    """BasicBlock networks (R18/34) with trainable BN: everything but BN's step counters comes from the file."""
    torch.manual_seed(0)
    state = _perturbed_state(torchvision.models.resnet18(weights=None), seed=3)
    source = tmp_path / "resnet18.pth"
    # Nested under "state_dict" with DataParallel's "module." prefix, as many training scripts save it.
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, source)
    output = tmp_path / "R-18.pkl"
    converted = convert_file(str(source), str(output), kind="resnet")
    assert converted.config["MODEL.RESNETS.DEPTH"] == 18
    assert converted.config["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64

    cfg = tiny_cfg("MODEL.WEIGHTS", str(output))
    model = build_model(cfg)
    counters = {
        k[len(BOTTOM_UP):]: v.clone() for k, v in model.state_dict().items()
        if k.startswith(BOTTOM_UP) and k.endswith("num_batches_tracked")
    }
    incompatible = _load_like_training(model, cfg.MODEL.WEIGHTS)
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    # torch's BatchNorm fills a missing num_batches_tracked itself (with 0), so nothing is reported missing.
    assert not [k for k in incompatible.missing_keys if k.startswith(BOTTOM_UP)]
    _assert_bottom_up_filled(model, _expected_resnet(state), untouched=counters)


# --------------------------------------------------------------------------------------------------------------
# Swin (official Microsoft and timm layouts) -> this project's Swin backbone
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_swin_t() -> Dict[str, torch.Tensor]:
    """State dict of a randomly initialised, perturbed ``timm`` Swin-T (timm >= 0.9 layout)."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    state = _perturbed_state(model, seed=4)
    assert "layers.1.downsample.reduction.weight" in state and "layers.0.downsample.reduction.weight" not in state
    assert "head.fc.weight" in state
    return state


def _relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def _timm_to_official(timm_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The same weights as a Microsoft checkpoint: merging at the end of the previous stage, ``head``, buffers."""
    official = {}
    for key, value in timm_state.items():
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if match:
            key = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        official[key.replace("head.fc.", "head.")] = value
    for key in list(official):
        match = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$", key)
        if match:
            official[key.replace("bias_table", "index")] = _relative_position_index(7)
            grid = 56 // 2 ** int(match.group(1))  # 224 / 4 tokens per side at stage 0
            if int(match.group(2)) % 2 == 1 and grid > 7:  # shifted blocks of stages larger than a window
                mask_key = key.replace("attn.relative_position_bias_table", "attn_mask")
                official[mask_key] = torch.zeros((grid // 7) ** 2, 49, 49)
    return official


def _expected_swin(official: Dict[str, torch.Tensor], keep_final_norm: bool) -> Dict[str, torch.Tensor]:
    """Official-layout tensors the backbone must hold: all but the classifier, buffers and final norm."""
    expected = {
        k: v for k, v in official.items()
        if not k.startswith(("head.", "norm.")) and not k.endswith(("relative_position_index", "attn_mask"))
    }
    if keep_final_norm:
        expected.update({"norm3.weight": official["norm.weight"], "norm3.bias": official["norm.bias"]})
    return expected


SENTINEL = -7.0


@pytest.fixture(scope="module")
def swin_model() -> nn.Module:
    """A DiffusionInst model with the Swin-T backbone, shared by the Swin tests (each resets it first)."""
    cfg = load_cfg("Base-DiffusionInst.yaml", *TINY_OPTS, *SWIN_T_OPTS)
    torch.manual_seed(0)
    return build_model(cfg)


def _reset_bottom_up(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Set every bottom-up tensor to SENTINEL, so that what a load fills is told apart from what it leaves."""
    with torch.no_grad():
        for value in model.backbone.bottom_up.state_dict().values():
            value.fill_(SENTINEL)
    return {k: v.clone() for k, v in model.backbone.bottom_up.state_dict().items()}


def test_swin_timm_checkpoint(timm_swin_t, swin_model, tmp_path, capsys) -> None:
    source = tmp_path / "swin_tiny_patch4_window7_224.timm.pth"
    torch.save(timm_swin_t, source)
    output = tmp_path / "swin_tiny_timm.pkl"
    assert _tool().main(["--type", "swin", str(source), str(output)]) == 0
    printed = capsys.readouterr().out
    assert "swin-timm" in printed and "MODEL.SWIN.SIZE T" in printed
    # The suggested options, pasted onto a command line, give the config the tests build.
    suggested = shlex.split(printed.split("Use with:", 1)[1])
    cfg = load_cfg("Base-DiffusionInst.yaml", *suggested)
    assert cfg.MODEL.WEIGHTS == str(output) and cfg.MODEL.SWIN.SIZE == "T"
    assert list(cfg.MODEL.FPN.IN_FEATURES) == ["swin0", "swin1", "swin2", "swin3"]
    assert cfg.MODEL.BACKBONE.NAME == "build_swin_fpn_backbone"

    before = _reset_bottom_up(swin_model)
    incompatible = _load_like_training(swin_model, str(output))
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    # The stage output norms have no ImageNet counterpart: the original release trains them from scratch.
    untouched = {k: v for k, v in before.items() if k.split(".")[0] in ("norm0", "norm1", "norm2", "norm3")}
    assert {k for k in incompatible.missing_keys if k.startswith(BOTTOM_UP)} == {BOTTOM_UP + k for k in untouched}
    _assert_bottom_up_filled(swin_model, _expected_swin(_timm_to_official(timm_swin_t), False), untouched)


def test_swin_official_checkpoint_with_final_norm(timm_swin_t, swin_model, tmp_path) -> None:
    official = _timm_to_official(timm_swin_t)
    assert "layers.0.downsample.reduction.weight" in official and "layers.3.downsample.norm.weight" not in official
    source = tmp_path / "swin_tiny_patch4_window7_224_22k.pth"
    torch.save({"model": official}, source)
    output = tmp_path / "swin_tiny_official.pth"
    converted = convert_file(str(source), str(output), keep_final_norm=True)
    assert converted.source_format == "swin-official" and converted.config["MODEL.SWIN.SIZE"] == "T"
    assert {"head.weight", "head.bias", "layers.0.blocks.0.attn.relative_position_index"} <= set(converted.dropped)

    before = _reset_bottom_up(swin_model)
    incompatible = _load_like_training(swin_model, str(output))
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    untouched = {k: v for k, v in before.items() if k.split(".")[0] in ("norm0", "norm1", "norm2")}
    _assert_bottom_up_filled(swin_model, _expected_swin(official, True), untouched)


def test_swin_both_layouts_convert_to_the_same_weights(timm_swin_t) -> None:
    from_timm = convert_pretrained(timm_swin_t)
    from_official = convert_pretrained({"model": _timm_to_official(timm_swin_t)})
    assert set(from_timm.model) == set(from_official.model)
    assert all(torch.equal(from_timm.model[k], from_official.model[k]) for k in from_timm.model)


def test_swin_final_norm_is_not_mistaken_for_a_head_norm(timm_swin_t, tmp_path) -> None:
    """detectron2 matches names by suffix; a bare "norm3.weight" would also match the head's own norm3."""
    detector = nn.Module()
    detector.backbone = nn.Module()
    detector.backbone.bottom_up = nn.Module()
    detector.backbone.bottom_up.norm3 = nn.LayerNorm(768)
    detector.head = nn.Module()
    detector.head.inst_interact = nn.Module()
    detector.head.inst_interact.norm3 = nn.LayerNorm(768)  # as wide as Swin-T's last stage
    output = tmp_path / "swin_with_norm.pkl"
    save_converted(convert_pretrained(timm_swin_t, keep_final_norm=True), str(output))
    incompatible = _load_like_training(detector, str(output))
    assert sorted(incompatible.missing_keys) == ["head.inst_interact.norm3.bias", "head.inst_interact.norm3.weight"]
    assert torch.equal(detector.backbone.bottom_up.norm3.weight, timm_swin_t["norm.weight"])
    assert torch.equal(detector.head.inst_interact.norm3.weight, torch.ones(768))


# --------------------------------------------------------------------------------------------------------------
# Original DiffusionInst checkpoints load as they are
# --------------------------------------------------------------------------------------------------------------


def test_diffusioninst_checkpoint_loads_without_conversion(tmp_path, capsys) -> None:
    """A saved DiffusionInst model is loaded as it is (tests/test_state_dict.py checks that the original
    release's R50 checkpoint has exactly the model's keys and shapes, so it loads the same way)."""
    torch.manual_seed(0)
    trained = build_model(tiny_cfg())
    state = _perturbed_state(trained, seed=5)
    path = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 1499}, path)

    cfg = tiny_cfg("MODEL.WEIGHTS", str(path))
    torch.manual_seed(1)
    model = build_model(cfg)
    incompatible = _load_like_training(model, cfg.MODEL.WEIGHTS)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    # The converter refuses it, saying that no conversion is needed.
    assert _tool().main([str(path), str(tmp_path / "unused.pkl")]) == 1
    assert "needs no conversion" in capsys.readouterr().err
    assert not (tmp_path / "unused.pkl").exists()


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


def test_missing_input_names_the_file(tmp_path, capsys) -> None:
    missing = tmp_path / "no_such_weights.pth"
    with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
        load_weights_file(str(missing))
    assert _tool().main([str(missing), str(tmp_path / "out.pkl")]) == 1
    assert "no_such_weights.pth" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, kind, expected",
    [
        ({"encoder.weight": torch.zeros(2)}, None, ["conv1.weight", "patch_embed.proj.weight"]),
        ({"model": {"patch_embed.proj.weight": torch.zeros(2)}}, "resnet", ["layer1.0.conv1.weight"]),
        ({"conv1.weight": torch.zeros(2)}, "swin", ["relative_position_bias_table"]),
        (torch.zeros(3), None, ["not a dict"]),
    ],
)
def test_unrecognised_format_names_file_and_expected_keys(tmp_path, content, kind, expected) -> None:
    path = tmp_path / "mystery.pth"
    torch.save(content, path)
    with pytest.raises(WeightsFormatError) as error:
        convert_file(str(path), str(tmp_path / "out.pkl"), kind=kind)
    message = str(error.value)
    assert "mystery.pth" in message
    for fragment in expected:
        assert fragment in message
    assert not (tmp_path / "out.pkl").exists()


def test_unknown_keys_are_reported_not_dropped() -> None:
    state = dict(torchvision.models.resnet18(weights=None).state_dict())
    state["layer1.0.se.fc.weight"] = torch.zeros(4, 64)
    with pytest.raises(WeightsFormatError, match=r"layer1\.0\.se\.fc\.weight"):
        convert_torchvision_resnet(state, source="se_resnet18.pth")

    swin_v2_like = {"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}
    swin_v2_like["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(169, 3)
    swin_v2_like["layers.0.blocks.0.attn.logit_scale"] = torch.zeros(3, 1, 1)
    assert detect_format(swin_v2_like) == "swin"
    with pytest.raises(WeightsFormatError, match="swinv2.pth"):
        convert_pretrained(swin_v2_like, source="swinv2.pth")
