"""Swin Transformer (+ FPN) backbone for detectron2, built from timm's Swin modules.

The bottom-up network reuses timm's ``PatchEmbed``, ``SwinTransformerBlock`` (window attention + MLP) and
``PatchMerging`` modules, but arranges them in the *official* Microsoft / Swin-Transformer-Object-Detection
module tree used by the original DiffusionInst release::

    patch_embed.{proj,norm}
    layers.{i}.blocks.{j}.{norm1,attn.{relative_position_bias_table,qkv,proj},norm2,mlp.{fc1,fc2}}
    layers.{i}.downsample.{norm,reduction}      # patch merging at the END of stage i (i < 3)
    norm{i}                                     # LayerNorm of output level i (i in OUT_FEATURES)

so original-release checkpoints (``backbone.bottom_up.*``) and the official ImageNet weights (also through
detectron2's suffix matching of converted ``.pkl`` files) load without renaming. timm 1.0 places patch merging
at the START of stages 1..3; ``convert_timm_swin_state_dict`` moves it back. The layout cannot follow timm's,
because ``layers.1/2.downsample`` would then exist in both layouts with different shapes, and fvcore's checkpointer
drops shape-mismatched keys before any load hook could rename them.

The blocks are run the way the official detection code runs them (pad the window grid at the bottom/right,
*then* roll, mask computed on the padded grid, shift kept even where a feature map is no larger than a window),
so converted official weights give the original outputs for any input size; timm's own forward rolls before
padding and drops the shift of stages no larger than a window, which differs whenever H/4 or W/4 is not a
multiple of the window size.

Output features are named ``"swin{i}"`` for stage ``i`` (as in the original release), with strides 4, 8, 16, 32
and channels C, 2C, 4C, 8C; ``MODEL.SWIN.OUT_FEATURES`` holds the stage indices.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from timm.layers import PatchEmbed
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse

__all__ = [
    "SWIN_SIZES",
    "SwinBackbone",
    "add_swin_config",
    "build_swin_backbone",
    "build_swin_fpn_backbone",
    "convert_official_swin_state_dict",
    "convert_timm_swin_state_dict",
]

SWIN_SIZES: Dict[str, Dict[str, Any]] = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7, drop_path_rate=0.3),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7, drop_path_rate=0.3),
}
# Size names of the original release's configs (same architectures; "-384" variants use 12x12 windows).
SWIN_SIZES["B-22k"] = SWIN_SIZES["B"]
SWIN_SIZES["L-22k"] = SWIN_SIZES["L"]
SWIN_SIZES["B-22k-384"] = dict(SWIN_SIZES["B"], window_size=12)
SWIN_SIZES["L-22k-384"] = dict(SWIN_SIZES["L"], window_size=12)

_RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask")
_DOWNSAMPLE_KEY = re.compile(r"^layers\.(\d+)\.downsample\.")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


def add_swin_config(cfg: CN) -> None:
    """Add the ``MODEL.SWIN`` options read by ``build_swin_backbone`` / ``build_swin_fpn_backbone``."""
    cfg.MODEL.SWIN = CN()
    # Architecture: "T", "S", "B" or "L" (original-release names "B-22k", "L-22k", "B-22k-384", "L-22k-384" too).
    cfg.MODEL.SWIN.SIZE = "B"
    # Recompute each Swin block in the backward pass (activation checkpointing) to save memory.
    cfg.MODEL.SWIN.USE_CHECKPOINT = False
    # Stage indices to output, named "swin{i}" with stride 2 ** (i + 2) and channels embed_dim * 2 ** i.
    cfg.MODEL.SWIN.OUT_FEATURES = (0, 1, 2, 3)
    # Stochastic depth rate of the last block; None uses the size default (T/S: 0.2, B/L: 0.3).
    cfg.MODEL.SWIN.DROP_PATH_RATE = None


def _shifted_window_mask(
    height: int,
    width: int,
    window_size: Tuple[int, int],
    shift_size: Tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask (0 / -100) of shape (num_windows, Wh*Ww, Wh*Ww) for a rolled, padded (height, width) grid.

    Tokens may only attend within the same region; the regions are the three bands per axis
    ``[0, H - Wh)``, ``[H - Wh, H - shift)`` and ``[H - shift, H)`` of the padded grid.
    """
    regions = []
    for size, window, shift in zip((height, width), window_size, shift_size):
        band = torch.zeros(size, device=device, dtype=torch.long)
        band[size - window:] = 1
        band[size - shift:] = 2
        regions.append(band)
    label = (regions[0][:, None] * 3 + regions[1][None, :]).to(dtype)
    label_windows = window_partition(label[None, :, :, None], window_size).flatten(1)
    different = label_windows[:, None, :] != label_windows[:, :, None]
    return torch.zeros_like(different, dtype=dtype).masked_fill(different, -100.0)


def _swin_block_forward(
    block: SwinTransformerBlock, x: torch.Tensor, attn_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Run a timm Swin block with the official detection windowing: (N, H, W, C) -> (N, H, W, C).

    Pads to a multiple of the window, then applies the cyclic shift, as the original release does.
    """
    _, height, width, channels = x.shape
    win_h, win_w = block.window_size
    shift_h, shift_w = block.shift_size
    shifted = shift_h > 0 or shift_w > 0

    y = block.norm1(x)
    pad_b = (win_h - height % win_h) % win_h
    pad_r = (win_w - width % win_w) % win_w
    y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
    padded_h, padded_w = height + pad_b, width + pad_r
    if shifted:
        y = torch.roll(y, shifts=(-shift_h, -shift_w), dims=(1, 2))

    windows = window_partition(y, (win_h, win_w)).view(-1, win_h * win_w, channels)
    windows = block.attn(windows, mask=attn_mask if shifted else None)
    y = window_reverse(windows.view(-1, win_h, win_w, channels), (win_h, win_w), padded_h, padded_w)

    if shifted:
        y = torch.roll(y, shifts=(shift_h, shift_w), dims=(1, 2))
    y = y[:, :height, :width, :]

    x = x + block.drop_path1(y)
    x = x + block.drop_path2(block.mlp(block.norm2(x)))
    return x


class _SwinStage(nn.Module):
    """One official-layout Swin stage: ``blocks`` then an optional ``downsample`` into the next stage."""

    def __init__(self, blocks: nn.Sequential, downsample: Optional[nn.Module]):
        super().__init__()
        self.blocks = blocks
        self.downsample = downsample


def _normalize_out_indices(out_features: Iterable[Union[int, str]], num_stages: int) -> Tuple[int, ...]:
    """Turn stage indices or ``"swin{i}"`` names into sorted, unique stage indices."""
    indices = set()
    for feature in out_features:
        index = int(feature[4:]) if isinstance(feature, str) and feature.startswith("swin") else int(feature)
        if not 0 <= index < num_stages:
            raise ValueError(f"Swin output stage {feature!r} is not in [0, {num_stages}).")
        indices.add(index)
    if not indices:
        raise ValueError("Swin backbone needs at least one output stage.")
    return tuple(sorted(indices))


class SwinBackbone(Backbone):
    """Swin Transformer bottom-up network: (N, 3, H, W) -> {"swin{i}": (N, C * 2**i, H / 2**(i+2), W / 2**(i+2))}.

    Module names follow the official layout (see the module docstring); ``load_state_dict`` also accepts official
    ImageNet/detection and timm state dicts and converts them on the fly (see ``_load_from_state_dict``).
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        drop_path_rate: float = 0.2,
        out_indices: Iterable[Union[int, str]] = (0, 1, 2, 3),
        use_checkpoint: bool = False,
        in_chans: int = 3,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
    ):
        """
        Args:
            embed_dim: channels C of stage 0; stage i has C * 2**i.
            depths, num_heads: blocks and attention heads per stage.
            window_size: side of the square attention windows.
            drop_path_rate: stochastic depth of the last block, rising linearly from 0 over all blocks.
            out_indices: stages to output, as indices or ``"swin{i}"`` names.
            use_checkpoint: recompute each block in the backward pass instead of storing its activations.
            in_chans, patch_size, mlp_ratio: input channels, patch-embedding stride, MLP hidden/embed ratio.
        """
        super().__init__()
        num_stages = len(depths)
        trunk = SwinTransformer(
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            always_partition=True,
            strict_img_size=False,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            embed_layer=partial(PatchEmbed, dynamic_img_pad=True),
        )
        self.patch_embed = trunk.patch_embed
        stages = list(trunk.layers)
        self.layers = nn.ModuleList(
            _SwinStage(stage.blocks, stages[i + 1].downsample if i + 1 < num_stages else None)
            for i, stage in enumerate(stages)
        )

        self.num_features = [embed_dim * 2**i for i in range(num_stages)]
        self.out_indices = _normalize_out_indices(out_indices, num_stages)
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.use_checkpoint = use_checkpoint

        self._out_features = [f"swin{i}" for i in self.out_indices]
        self._out_feature_channels = {f"swin{i}": self.num_features[i] for i in self.out_indices}
        self._out_feature_strides = {f"swin{i}": patch_size * 2**i for i in self.out_indices}

    @property
    def size_divisibility(self) -> int:
        """Inputs are padded to a multiple of 32 so every stage has an integral size for the FPN."""
        return 32

    @property
    def padding_constraints(self) -> Dict[str, int]:
        """Padding constraints for detectron2 versions newer than v0.6."""
        return {"size_divisibility": 32}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(N, C_in, H, W) images -> dict of NCHW features ``"swin{i}"`` of stride 4 * 2**i."""
        if x.dim() != 4:
            raise ValueError(f"SwinBackbone takes (N, C, H, W) inputs, got shape {tuple(x.shape)}.")
        x = self.patch_embed(x)
        last = self.out_indices[-1]
        outputs = {}
        for i, stage in enumerate(self.layers[: last + 1]):
            x = self._forward_blocks(stage.blocks, x)
            if i in self.out_indices:
                y = getattr(self, f"norm{i}")(x)
                outputs[f"swin{i}"] = y.permute(0, 3, 1, 2).contiguous()
            if i < last:
                x = stage.downsample(x)
        return outputs

    def _forward_blocks(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """Run one stage's blocks on (N, H, W, C) tokens, sharing the shifted-window mask between blocks."""
        first = blocks[0]
        win_h, win_w = first.window_size
        padded_h = -(-x.shape[1] // win_h) * win_h
        padded_w = -(-x.shape[2] // win_w) * win_w
        mask = None
        for block in blocks:
            if mask is None and any(block.shift_size):
                mask = _shifted_window_mask(
                    padded_h, padded_w, block.window_size, block.shift_size, x.device, x.dtype
                )
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(_swin_block_forward, block, x, mask, use_reentrant=False)
            else:
                x = _swin_block_forward(block, x, mask)
        return x

    def _load_from_state_dict(
        self,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Dict[str, Any],
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        """Convert official (Microsoft) or timm Swin keys under ``prefix`` in place, then load as usual.

        Makes ``model.load_state_dict(original_release_checkpoint)`` load with no missing or unexpected backbone
        keys: buffers that timm recomputes (``relative_position_index``, ``attn_mask``) and a classification
        ``head`` / final ``norm`` are dropped, and timm's start-of-stage patch merging is moved to the previous
        stage. Through detectron2's ``DetectionCheckpointer``, timm-layout checkpoints must be converted
        beforehand with ``convert_timm_swin_state_dict``: fvcore drops their shape-mismatched
        ``layers.{1,2}.downsample`` entries before this hook runs.
        """
        own = {key: state_dict.pop(key) for key in list(state_dict) if key.startswith(prefix)}
        if _is_timm_layout(own, prefix):
            own = convert_timm_swin_state_dict(own, prefix=prefix)
        else:
            own = convert_official_swin_state_dict(own, prefix=prefix)
        state_dict.update(own)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _unwrap_checkpoint(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return the weights of a checkpoint that nests them under "model" or "state_dict"."""
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), Mapping):
            return state_dict[key]
    return state_dict


def _is_timm_layout(state_dict: Mapping[str, Any], prefix: str = "") -> bool:
    """True if the Swin keys under ``prefix`` merge patches at the start of a stage (timm >= 0.9)."""
    merge_stages = {
        int(match.group(1))
        for key in state_dict
        if key.startswith(prefix) and (match := _DOWNSAMPLE_KEY.match(key[len(prefix):]))
    }
    return bool(merge_stages) and 0 not in merge_stages


def _rename_final_norm(state_dict: Dict[str, Any], prefix: str, keep_final_norm: bool) -> Dict[str, Any]:
    """Drop (or rename to ``norm{last stage}``) the classification-time final LayerNorm ``norm.*``."""
    final_norm = {key: state_dict.pop(key) for key in list(state_dict) if key.startswith(prefix + "norm.")}
    stages = [
        int(match.group(1))
        for key in state_dict
        if key.startswith(prefix) and (match := _LAYER_KEY.match(key[len(prefix):]))
    ]
    if keep_final_norm and final_norm and stages:
        target = f"{prefix}norm{max(stages)}."
        for key, value in final_norm.items():
            state_dict.setdefault(target + key[len(prefix + "norm."):], value)
    return state_dict


def convert_official_swin_state_dict(
    state_dict: Mapping[str, Any], prefix: str = "", keep_final_norm: bool = False
) -> Dict[str, Any]:
    """Map an official-layout Swin state dict (Microsoft ImageNet ``.pth`` or original DiffusionInst) to ours.

    Keys under ``prefix`` (e.g. ``"backbone.bottom_up."`` for a full DiffusionInst checkpoint, ``""`` for an
    ImageNet file) are converted, others are kept; weights nested under ``"model"`` are unwrapped. The module tree
    already matches the official one (patch merging at the end of stage i is ``layers.{i}.downsample`` in both),
    so the conversion drops the buffers timm recomputes (``relative_position_index``, ``attn_mask``), the
    classification ``head`` and the final ``norm`` (the original release trains ``norm0..3`` from scratch);
    ``keep_final_norm=True`` instead loads that final ``norm`` into ``norm{last stage}``.
    """
    converted: Dict[str, Any] = {}
    for key, value in _unwrap_checkpoint(state_dict).items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            if name.rsplit(".", 1)[-1] in _RECOMPUTED_BUFFERS or name.startswith("head."):
                continue
        converted[key] = value
    return _rename_final_norm(converted, prefix, keep_final_norm)


def convert_timm_swin_state_dict(
    state_dict: Mapping[str, Any], prefix: str = "", keep_final_norm: bool = False
) -> Dict[str, Any]:
    """Map a timm Swin state dict (``timm.create_model("swin_*").state_dict()`` or its hub files) to ours.

    timm >= 0.9 merges patches at the start of stages 1..3 (``layers.{i}.downsample``); these move to
    ``layers.{i-1}.downsample``. The ``head``, recomputed buffers and final ``norm`` are handled as in
    ``convert_official_swin_state_dict``; checkpoints of older timm (official layout) are passed to it unchanged.
    """
    state_dict = _unwrap_checkpoint(state_dict)
    if not _is_timm_layout(state_dict, prefix):
        return convert_official_swin_state_dict(state_dict, prefix=prefix, keep_final_norm=keep_final_norm)
    shifted: Dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            match = _DOWNSAMPLE_KEY.match(name)
            if match:
                name = f"layers.{int(match.group(1)) - 1}.downsample." + name[match.end():]
            key = prefix + name
        shifted[key] = value
    return convert_official_swin_state_dict(shifted, prefix=prefix, keep_final_norm=keep_final_norm)


def _swin_from_cfg(cfg: CN, input_shape: ShapeSpec) -> SwinBackbone:
    """Build ``SwinBackbone`` from ``cfg.MODEL.SWIN`` (see ``add_swin_config``)."""
    if "SWIN" not in cfg.MODEL:
        raise KeyError("cfg.MODEL.SWIN is missing: call add_swin_config(cfg) before building a Swin backbone.")
    swin = cfg.MODEL.SWIN
    if swin.SIZE not in SWIN_SIZES:
        raise ValueError(f"Unknown MODEL.SWIN.SIZE {swin.SIZE!r}; choose from {sorted(SWIN_SIZES)}.")
    arch = dict(SWIN_SIZES[swin.SIZE])
    if swin.DROP_PATH_RATE is not None:
        arch["drop_path_rate"] = float(swin.DROP_PATH_RATE)
    return SwinBackbone(
        **arch,
        out_indices=swin.OUT_FEATURES,
        use_checkpoint=swin.USE_CHECKPOINT,
        in_chans=input_shape.channels if input_shape.channels is not None else 3,
    )


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg: CN, input_shape: ShapeSpec) -> SwinBackbone:
    """Swin bottom-up network alone, with features ``"swin{i}"`` for i in ``MODEL.SWIN.OUT_FEATURES``."""
    return _swin_from_cfg(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_swin_fpn_backbone(cfg: CN, input_shape: ShapeSpec) -> FPN:
    """Swin + FPN with a max-pooled top level, giving p2..p6 of ``MODEL.FPN.OUT_CHANNELS`` channels.

    ``MODEL.FPN.IN_FEATURES`` names Swin features (``"swin0"``..``"swin3"``); left empty, all outputs are used.
    """
    bottom_up = _swin_from_cfg(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES) or bottom_up._out_features
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_swintransformer_backbone(cfg: CN, input_shape: ShapeSpec) -> SwinBackbone:
    """Original-release name of ``build_swin_backbone``, so its configs build unchanged."""
    return build_swin_backbone(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_swintransformer_fpn_backbone(cfg: CN, input_shape: ShapeSpec) -> FPN:
    """Original-release name of ``build_swin_fpn_backbone``, so its configs build unchanged."""
    return build_swin_fpn_backbone(cfg, input_shape)
