"""Backbones registered in detectron2's ``BACKBONE_REGISTRY`` (importing this package registers them)."""
from .swin import (
    SWIN_SIZES,
    SwinBackbone,
    add_swin_config,
    build_swin_backbone,
    build_swin_fpn_backbone,
    convert_official_swin_state_dict,
    convert_timm_swin_state_dict,
)

__all__ = [
    "SWIN_SIZES",
    "SwinBackbone",
    "add_swin_config",
    "build_swin_backbone",
    "build_swin_fpn_backbone",
    "convert_official_swin_state_dict",
    "convert_timm_swin_state_dict",
]
