"""CPU kernels of DiffusionInst's layers, behind one switch (``MODEL.DiffusionInst.CPU_KERNELS``).

* :class:`ROIAlignCPU`: RoIAlign run on chunks of the RoIs in parallel threads, with a sparse-matrix backward.
* :class:`OneDNNLinear`: nn.Linear through oneDNN's inner product (faster than MKL's sgemm on AMD CPUs).

Both keep the parameters, state_dict and outputs of the layers they stand in for, and fall back to the plain
torchvision/torch op wherever the fast one does not apply (CUDA, other dtypes, autocast, builds without the op).
The model code uses plain ``nn.Linear`` and detectron2's ``ROIPooler`` (as :class:`LevelSelectROIPooler`, which
pools without host syncs off the CPU kernels); :func:`use_cpu_kernels` swaps them.
"""
from __future__ import annotations

from detectron2.layers import ROIAlign
from torch import nn

from .linear import OneDNNLinear, onednn_linear, onednn_linear_available
from .roi_align import ROIAlignCPU, parallel_roi_align, roi_align_fast_backward, roi_align_matrix
from .roi_pool import LevelSelectROIPooler

__all__ = [
    "LevelSelectROIPooler",
    "OneDNNLinear",
    "ROIAlignCPU",
    "onednn_linear",
    "onednn_linear_available",
    "parallel_roi_align",
    "roi_align_fast_backward",
    "roi_align_matrix",
    "use_cpu_kernels",
]

# Plain layer -> its CPU-kernel version (same attributes and parameters, only ``forward`` differs).
_KERNELS = {nn.Linear: OneDNNLinear, ROIAlign: ROIAlignCPU}


def use_cpu_kernels(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every ``nn.Linear`` and detectron2 ``ROIAlign`` inside ``module`` to its CPU kernel (``enabled``) or
    back, in place (the layer's class changes; its parameters and state_dict stay the same). Returns ``module``."""
    swaps = _KERNELS if enabled else {fast: plain for plain, fast in _KERNELS.items()}
    for layer in module.modules():
        if type(layer) in swaps:  # exact types: subclasses such as attention's out_proj are left alone
            layer.__class__ = swaps[type(layer)]
    return module
