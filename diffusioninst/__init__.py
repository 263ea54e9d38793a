"""DiffusionInst: instance segmentation as denoising of boxes and instance-aware filters (arXiv 2212.02773).

Importing this package applies the detectron2 compatibility shims, then registers the meta-architecture,
the Swin backbones and the builtin shapes datasets with detectron2.
"""
from . import compat

compat.apply()

from .checkpoint import DiffusionInstCheckpointer, load_weights  # noqa: E402
from .config import ConfigError, add_diffusioninst_config, check_config, get_diffusioninst_cfg, merge_config  # noqa: E402,E501
from .data import DiffusionInstDatasetMapper, register_datasets_from_cfg  # noqa: E402
from .modeling.backbone import swin  # noqa: E402,F401  (registers build_swin_fpn_backbone)
from .modeling.meta_arch import DiffusionInst  # noqa: E402
from .solver import build_optimizer  # noqa: E402

__all__ = [
    "add_diffusioninst_config",
    "check_config",
    "get_diffusioninst_cfg",
    "ConfigError",
    "DiffusionInstCheckpointer",
    "load_weights",
    "merge_config",
    "DiffusionInst",
    "DiffusionInstDatasetMapper",
    "register_datasets_from_cfg",
    "build_optimizer",
]
