"""Turn ImageNet-pretrained backbone checkpoints into files that ``MODEL.WEIGHTS`` loads into DiffusionInst.

Two kinds of input are handled:

* **torchvision ResNets** (``torch.save(resnet50().state_dict())``: ``conv1.weight``, ``bn1.*``, ``layer1.0.*``,
  ``fc.*``). detectron2's ResNet names the same tensors differently (``stem.conv1``, ``res2.0.conv1.norm``,
  ``res2.0.shortcut``), so keys are renamed; ``fc`` and ``num_batches_tracked`` have no place in the backbone.
  torchvision puts the stride in the 3x3 conv and expects RGB input normalised with the ImageNet mean/std, which
  is what ``configs/Base-DiffusionInst.yaml`` sets (``RESNETS.STRIDE_IN_1X1: False``, ``FORMAT: RGB``).
* **Swin Transformers**, either official Microsoft checkpoints (``{"model": {...}}``, patch merging at the end
  of stage i as ``layers.{i}.downsample``) or timm >= 0.9 state dicts (patch merging at the start of stages 1..3).
  The project's Swin backbone keeps the official layout, so timm's merging layers move one stage back, and the
  classification ``head``, the final ``norm`` (unless asked to keep it as ``norm{last}``) and the buffers the
  backbone recomputes are dropped (see ``diffusioninst.modeling.backbone.swin``).

The result is written like detectron2's model-zoo ImageNet files: ``{"model": {name: array}, "__author__": ...,
"matching_heuristics": True}`` with backbone-relative names. ``DetectionCheckpointer`` then matches every name
as a suffix of the model's keys (``stem.conv1.weight`` -> ``backbone.bottom_up.stem.conv1.weight``), so one file
serves any wrapper around the backbone (FPN or not). Full DiffusionInst checkpoints (the original release's
``model_final.pth``) need no conversion: their keys already equal the model's.

The conversion functions are pure (state dict in, ``ConvertedWeights`` out); ``load_weights_file``,
``save_converted`` and ``convert_file`` do the file I/O for ``tools/convert_pretrained.py``.
"""
from __future__ import annotations

import math
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .errors import UserError

__all__ = [
    "ConvertedWeights",
    "WeightsFormatError",
    "FORMATS",
    "convert_file",
    "convert_pretrained",
    "convert_swin",
    "convert_torchvision_resnet",
    "detect_format",
    "load_weights_file",
    "save_converted",
    "unwrap_state_dict",
]

FORMATS = ("resnet", "swin")

# What each format must contain; also quoted in the error for files that match none.
_EXPECTED_KEYS: Dict[str, Tuple[str, ...]] = {
    "resnet": ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight"),
    "swin": ("patch_embed.proj.weight", "layers.0.blocks.0.attn.relative_position_bias_table"),
}

# torchvision ResNet key -> detectron2 ResNet key (None: dropped).
_TV_STEM = re.compile(r"^(conv1|bn1)\.(.+)$")
_TV_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(conv\d+|bn\d+|downsample\.[01])\.(.+)$")
# The depth detectron2 calls a torchvision ResNet by, from its blocks per stage and block type.
_RESNET_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
_SWIN_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


class WeightsFormatError(UserError, ValueError):
    """A checkpoint is not in a format this module converts (or is already a detectron2 checkpoint)."""


@dataclass
class ConvertedWeights:
    """Backbone weights under detectron2 names, plus what the conversion did.

    Attributes:
        model: backbone-relative name -> tensor (e.g. ``res2.0.conv1.weight``, ``layers.0.blocks.0.norm1.weight``;
            a kept Swin final norm is ``bottom_up.norm{last}.*``, see ``convert_swin``).
        author: ``__author__`` written to the file (logged by detectron2 when it reads the file).
        source_format: ``"torchvision-resnet"``, ``"swin-official"`` or ``"swin-timm"``.
        dropped: input keys left out on purpose (classifier, recomputed buffers, BN step counters, final norm).
        config: config options the weights need, e.g. ``{"MODEL.RESNETS.DEPTH": 50}``.
    """

    model: Dict[str, torch.Tensor]
    author: str
    source_format: str
    dropped: List[str] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)

    def checkpoint(self, as_numpy: bool) -> Dict[str, Any]:
        """The dict to write: detectron2's model-zoo layout, with name-matching heuristics switched on.

        ``as_numpy`` stores arrays (the ``.pkl`` convention of detectron2's own ImageNet files); otherwise
        tensors, which ``torch.load(weights_only=True)`` can read back.
        """
        model = {k: (v.detach().cpu().numpy() if as_numpy else v.detach().cpu()) for k, v in self.model.items()}
        return {"model": model, "__author__": self.author, "matching_heuristics": True}


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """The weights of a checkpoint that nests them under ``"model"`` / ``"state_dict"``, without ``module.``.

    Official Swin files nest under ``"model"``, many training scripts under ``"state_dict"``, and
    DataParallel-saved weights carry a ``module.`` prefix on every key.
    """
    weights: Mapping[str, Any] = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(weights.get(key), Mapping):
            weights = weights[key]
            break
    weights = {k: v for k, v in weights.items() if isinstance(k, str)}
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    return dict(weights)


def _as_tensor(value: Any, name: str, source: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise WeightsFormatError(f"{source}: value of {name!r} is a {type(value).__name__}, not a tensor or array.")


def _format_error(source: str, state_dict: Mapping[str, Any], kinds: Tuple[str, ...], reason: str) -> str:
    """Error text naming the file, the keys each format in ``kinds`` needs, and the first keys found."""
    expected = "; ".join(f"{kind}: {', '.join(_EXPECTED_KEYS[kind])}" for kind in kinds)
    sample = ", ".join(list(state_dict)[:6]) or "(no tensors)"
    more = ", ..." if len(state_dict) > 6 else ""
    return f"{source}: {reason}. Expected keys like [{expected}]; found [{sample}{more}]."


def detect_format(state_dict: Mapping[str, Any], source: str = "checkpoint") -> str:
    """Which of ``FORMATS`` an (unwrapped) state dict is in, from its key names.

    Raises ``WeightsFormatError`` naming ``source`` for a detectron2 checkpoint (already loadable, nothing to
    convert) and for anything else that matches no format.
    """
    keys = set(state_dict)
    if any(k.startswith(("backbone.bottom_up.", "backbone.")) for k in keys) or "stem.conv1.weight" in keys:
        raise WeightsFormatError(
            f"{source} already holds detectron2 / DiffusionInst names (e.g. 'backbone.*' or 'stem.conv1.weight'); "
            "it needs no conversion: pass it to MODEL.WEIGHTS directly."
        )
    for kind in FORMATS:
        if all(k in keys for k in _EXPECTED_KEYS[kind]):
            return kind
    raise WeightsFormatError(_format_error(source, state_dict, FORMATS, "unrecognised checkpoint format"))


def _rename_torchvision_key(key: str) -> Optional[str]:
    """detectron2 name of one torchvision ResNet key; None for keys to drop; raises KeyError if unknown."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    stem = _TV_STEM.match(key)
    if stem:
        module, tensor = stem.groups()
        return "stem.conv1." + (tensor if module == "conv1" else "norm." + tensor)
    block = _TV_BLOCK.match(key)
    if block:
        stage, index, module, tensor = block.groups()
        prefix = f"res{int(stage) + 1}.{index}."
        if module.startswith("conv"):
            return prefix + f"{module}.{tensor}"
        if module.startswith("bn"):
            return prefix + f"conv{module[2:]}.norm.{tensor}"
        return prefix + ("shortcut." if module.endswith(".0") else "shortcut.norm.") + tensor
    raise KeyError(key)


def convert_torchvision_resnet(state_dict: Mapping[str, Any], source: str = "checkpoint") -> ConvertedWeights:
    """Rename a torchvision ResNet state dict (18/34/50/101/152) to detectron2 ResNet backbone names.

    ``layer{i}`` becomes ``res{i+1}``, ``bn{k}`` the ``norm`` of ``conv{k}``, ``downsample.{0,1}`` the
    ``shortcut`` conv and its norm; ``fc.*`` and ``num_batches_tracked`` are dropped. Unknown keys raise
    ``WeightsFormatError`` rather than being silently skipped, so a ResNeXt-style or modified network is noticed.
    ``config`` reports the ``MODEL.RESNETS`` options that build the matching detectron2 network.
    """
    state_dict = unwrap_state_dict(state_dict)
    missing = [k for k in _EXPECTED_KEYS["resnet"] if k not in state_dict]
    if missing:
        raise WeightsFormatError(_format_error(source, state_dict, ("resnet",), "not a torchvision ResNet"))
    model: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    unknown: List[str] = []
    for key, value in state_dict.items():
        try:
            name = _rename_torchvision_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if name is None:
            dropped.append(key)
        else:
            model[name] = _as_tensor(value, key, source)
    if unknown:
        raise WeightsFormatError(
            f"{source}: keys that a torchvision ResNet does not have: {unknown[:8]}"
            f"{' ...' if len(unknown) > 8 else ''}."
        )

    blocks = tuple(
        len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")}) for i in range(1, 5)
    )
    bottleneck = "layer1.0.conv3.weight" in state_dict
    config: Dict[str, Any] = {"MODEL.RESNETS.STRIDE_IN_1X1": False, "INPUT.FORMAT": "RGB"}
    depth = _RESNET_DEPTHS.get((blocks, bottleneck))
    if depth is not None:
        config["MODEL.RESNETS.DEPTH"] = depth
    if not bottleneck:
        config["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64
    elif "layer1.0.conv2.weight" in state_dict:
        # Bottleneck width 64 per group in ResNet-50/101/152; wide ResNets (wide_resnet50_2) have 128.
        width = state_dict["layer1.0.conv2.weight"].shape[0]
        if width != 64:
            config["MODEL.RESNETS.WIDTH_PER_GROUP"] = int(width)
    return ConvertedWeights(model, "torchvision", "torchvision-resnet", dropped, config)


def _swin_architecture(state_dict: Mapping[str, torch.Tensor], source: str) -> Dict[str, Any]:
    """``SwinBackbone`` arguments read off an official-layout state dict's tensor shapes."""
    proj = state_dict["patch_embed.proj.weight"]
    depths: Dict[int, int] = {}
    for key in state_dict:
        match = _SWIN_BLOCK.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    if sorted(depths) != list(range(len(depths))):
        raise WeightsFormatError(f"{source}: Swin stages {sorted(depths)} are not numbered 0..n-1.")
    heads, windows, mlp_ratios = [], set(), set()
    embed_dim = int(proj.shape[0])
    for stage in range(len(depths)):
        prefix = f"layers.{stage}.blocks.0."
        try:
            table = state_dict[prefix + "attn.relative_position_bias_table"]
            fc1 = state_dict[prefix + "mlp.fc1.weight"]
        except KeyError as e:
            raise WeightsFormatError(
                f"{source}: Swin stage {stage} lacks {e.args[0]!r} (Swin V2 and other variants are not supported)."
            ) from None
        heads.append(int(table.shape[1]))
        windows.add((math.isqrt(int(table.shape[0])) + 1) // 2)
        mlp_ratios.add(fc1.shape[0] / (embed_dim * 2**stage))
    if len(windows) != 1 or len(mlp_ratios) != 1:
        raise WeightsFormatError(f"{source}: Swin stages disagree on window size {windows} or MLP ratio {mlp_ratios}.")
    return dict(
        embed_dim=embed_dim,
        depths=tuple(depths[i] for i in range(len(depths))),
        num_heads=tuple(heads),
        window_size=windows.pop(),
        mlp_ratio=mlp_ratios.pop(),
        in_chans=int(proj.shape[1]),
        patch_size=int(proj.shape[2]),
    )


def convert_swin(
    state_dict: Mapping[str, Any], keep_final_norm: bool = False, source: str = "checkpoint"
) -> ConvertedWeights:
    """Convert an official (Microsoft) or timm Swin ImageNet state dict to this project's Swin backbone names.

    Uses the backbone's own ``convert_timm_swin_state_dict`` (which hands official-layout input on to
    ``convert_official_swin_state_dict``), so the file and the load hook agree by construction. The result is
    then checked against a ``SwinBackbone`` of the architecture read off the tensor shapes, built on the meta
    device: a key it lacks or a shape it disagrees with (Swin V2, absolute position embeddings, ...) raises
    ``WeightsFormatError`` instead of being skipped at load time. Only the ``norm{i}`` output LayerNorms may be
    absent: the original release trains them from scratch (``keep_final_norm`` fills ``norm{last}`` from the
    classifier's final ``norm`` instead, written as ``bottom_up.norm{last}.*`` so it cannot also match the head's
    ``norm3``). ``config`` names the matching ``MODEL.SWIN.SIZE`` when one exists.
    """
    from .modeling.backbone.swin import SWIN_SIZES, SwinBackbone, _is_timm_layout, convert_timm_swin_state_dict

    state_dict = {k: _as_tensor(v, k, source) for k, v in unwrap_state_dict(state_dict).items()}
    if not all(k in state_dict for k in _EXPECTED_KEYS["swin"]):
        raise WeightsFormatError(_format_error(source, state_dict, ("swin",), "not a Swin Transformer"))
    timm_layout = _is_timm_layout(state_dict)
    model = convert_timm_swin_state_dict(state_dict, keep_final_norm=keep_final_norm)
    arch = _swin_architecture(model, source)
    with torch.device("meta"):
        reference = SwinBackbone(**arch, drop_path_rate=0.0, out_indices=range(len(arch["depths"])))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    unexpected = sorted(k for k in model if k not in expected)
    wrong = sorted(k for k in model if k in expected and tuple(model[k].shape) != expected[k])
    missing = sorted(k for k in expected if k not in model and not re.match(r"norm\d+\.", k))
    if unexpected or wrong or missing:
        raise WeightsFormatError(
            f"{source}: not a Swin (V1) backbone of the layout this project builds; unexpected keys "
            f"{unexpected[:6]}, missing keys {missing[:6]}, shape mismatches {wrong[:6]}."
        )
    # detectron2 matches checkpoint names as suffixes of model names, and a bare "norm3.weight" is also a suffix
    # of the DiffusionInst head's "head_series.{k}.norm3.weight" (an error when the widths agree): keep the
    # output norms apart with the name of the module that holds the Swin network in the FPN backbone.
    model = {(f"bottom_up.{k}" if re.match(r"norm\d+\.", k) else k): v for k, v in model.items()}
    dropped = sorted(
        k for k in state_dict
        if k.startswith("head.")
        or (k.startswith("norm.") and not keep_final_norm)
        or k.rsplit(".", 1)[-1] in ("relative_position_index", "attn_mask")
    )
    sizes = [
        name for name, size in SWIN_SIZES.items()
        if (size["embed_dim"], tuple(size["depths"]), tuple(size["num_heads"]), size["window_size"])
        == (arch["embed_dim"], arch["depths"], arch["num_heads"], arch["window_size"])
    ]
    config: Dict[str, Any] = {
        "MODEL.BACKBONE.NAME": "build_swin_fpn_backbone",
        "MODEL.FPN.IN_FEATURES": [f"swin{i}" for i in range(len(arch["depths"]))],
        "INPUT.FORMAT": "RGB",
    }
    if sizes:
        config["MODEL.SWIN.SIZE"] = sizes[0]
    return ConvertedWeights(
        model,
        "timm" if timm_layout else "microsoft/Swin-Transformer",
        "swin-timm" if timm_layout else "swin-official",
        dropped,
        config,
    )


def convert_pretrained(
    checkpoint: Mapping[str, Any],
    kind: Optional[str] = None,
    keep_final_norm: bool = False,
    source: str = "checkpoint",
) -> ConvertedWeights:
    """Convert a loaded checkpoint of ``kind`` (``"resnet"``, ``"swin"``, or None to detect it from the keys).

    ``keep_final_norm`` applies to Swin only. ``source`` (usually the file name) prefixes every error message.
    """
    state_dict = unwrap_state_dict(checkpoint)
    if kind is None:
        kind = detect_format(state_dict, source)
    if kind == "resnet":
        return convert_torchvision_resnet(state_dict, source)
    if kind == "swin":
        return convert_swin(state_dict, keep_final_norm=keep_final_norm, source=source)
    raise ValueError(f"Unknown checkpoint type {kind!r}; choose from {FORMATS}.")


def load_weights_file(path: str, allow_pickle: bool = False) -> Dict[str, Any]:
    """Read a checkpoint: ``.safetensors``, ``.pkl`` (pickle, as detectron2 reads them) or a ``torch.save`` file.

    ``torch.save`` files are read with ``weights_only=True`` (tensors and plain containers only) and ``.pkl`` files
    with an unpickler that admits only arrays and containers, unless ``allow_pickle`` is set, because unpickling an
    untrusted file can run arbitrary code.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path))
    if path.endswith(".pkl"):
        from .safe_load import load_pickled_weights

        loaded = load_pickled_weights(path, allow_pickle=allow_pickle)
        if not isinstance(loaded, Mapping):
            raise WeightsFormatError(f"{path}: holds a {type(loaded).__name__}, not a dict of weights.")
        return dict(loaded)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        from .safe_load import refused_object

        what = f"the object {refused_object(e)}" if refused_object(e) else "objects other than tensors"
        raise WeightsFormatError(
            f"{path}: holds {what}, not only weights; it was not loaded, since unpickling it could run code. If you "
            "trust the file, allow full unpickling (--allow-pickle)"
        ) from None
    except Exception as e:  # noqa: BLE001  (torch raises several types for non-checkpoint files)
        raise WeightsFormatError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") from None
    if not isinstance(loaded, Mapping):
        raise WeightsFormatError(f"{path}: holds a {type(loaded).__name__}, not a dict of weights.")
    return dict(loaded)


def save_converted(converted: ConvertedWeights, path: str) -> None:
    """Write ``converted`` to ``path``: a pickle of numpy arrays for ``.pkl``, else ``torch.save`` of tensors.

    Both carry ``matching_heuristics: True``, which makes ``DetectionCheckpointer`` match names by suffix.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if path.endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(converted.checkpoint(as_numpy=True), f)
    else:
        torch.save(converted.checkpoint(as_numpy=False), path)


def convert_file(
    input_path: str,
    output_path: str,
    kind: Optional[str] = None,
    keep_final_norm: bool = False,
    allow_pickle: bool = False,
) -> ConvertedWeights:
    """Read ``input_path``, convert it (see ``convert_pretrained``) and write ``output_path``; returns the result."""
    checkpoint = load_weights_file(input_path, allow_pickle=allow_pickle)
    converted = convert_pretrained(checkpoint, kind=kind, keep_final_norm=keep_final_norm, source=input_path)
    save_converted(converted, output_path)
    return converted
