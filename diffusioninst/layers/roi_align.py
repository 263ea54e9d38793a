"""RoIAlign for CPU: torchvision's kernel run on chunks of the RoIs in parallel, and a sparse-matrix backward.

Opt-in through ``MODEL.DiffusionInst.CPU_KERNELS`` (``diffusioninst.layers.use_cpu_kernels``).

torchvision's CPU kernels are serial. The forward here splits the RoIs into one chunk per intra-op thread and runs
torchvision's ``roi_align`` on each chunk in a worker thread (the op releases the GIL); every RoI is computed by
the same kernel, so outputs are bit-identical to one serial call. RoIAlign is linear in the features:
``out = W @ features`` with W holding each sample point's bilinear weights / count, at most 4 x grid_h x grid_w
non-zeros per output bin. The backward ``W^T @ grad_out`` reproduces torchvision's gradient (same weights, same
boundary rules) and is several times faster on CPU during training.
"""
from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import torch
from detectron2.layers import ROIAlign
from torch import Tensor
from torchvision.ops import roi_align

from ..runtime import set_thread_openmp_threads

__all__ = ["ROIAlignCPU", "parallel_roi_align", "roi_align_fast_backward", "roi_align_matrix"]

MIN_ROIS_PER_CHUNK = 8  # fewer RoIs than this per thread are pooled in one serial call (thread hand-off costs more)

_pool: Optional[ThreadPoolExecutor] = None
_pool_workers = 0
_pool_lock = threading.Lock()
_fork_hook_registered = False


def _single_threaded_worker() -> None:
    """Pool-thread initializer: torch ops in this thread run on it alone (OpenMP's per-thread thread count).

    Otherwise each worker's first parallel op (the zero-fill of its output) starts an OpenMP team of its own, and
    with more OpenMP threads than CPUs libgomp stops spinning between parallel regions, so that every later small
    op of the process waits for its threads to wake up (3x slower mask head, measured).
    """
    torch.get_num_threads()  # torch's once-per-thread OpenMP setup; run later, it would undo the next line
    set_thread_openmp_threads(1)


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads (torch's intra-op thread count; rebuilt when that changes)."""
    global _pool, _pool_workers, _fork_hook_registered
    with _pool_lock:
        if not _fork_hook_registered:  # the parent's threads do not exist in a forked child (data-loader workers)
            os.register_at_fork(after_in_child=_forget_pool_after_fork)
            _fork_hook_registered = True
        if _pool is None or _pool_workers != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roi_align",
                                       initializer=_single_threaded_worker)
            _pool_workers = workers
        return _pool


def _forget_pool_after_fork() -> None:
    global _pool, _pool_workers, _pool_lock
    _pool, _pool_workers, _pool_lock = None, 0, threading.Lock()


def parallel_roi_align(
    features: Tensor, rois: Tensor, output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """torchvision.ops.roi_align (B, C, H, W), (R, 5) -> (R, C, ph, pw), on CPU split over torch's intra-op threads.

    Bit-identical to one torchvision call (each RoI is pooled independently by the same kernel); on other devices,
    or with few RoIs, it is that call. Not differentiable itself: callers wrap it (see ``_RoIAlignFastBackward``).
    """
    threads = torch.get_num_threads()
    chunks = min(threads, rois.shape[0] // MIN_ROIS_PER_CHUNK)
    if features.device.type != "cpu" or chunks < 2:
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    dtype = features.dtype
    if dtype in (torch.float16, torch.bfloat16):
        # Autocast is thread-local, so its float32 cast of torchvision's op does not happen in the workers: do it here.
        features, rois = features.float(), rois.float()
    features = features.detach()
    parts = _thread_pool(threads).map(
        lambda r: roi_align(features, r, output_size, spatial_scale, sampling_ratio, aligned), rois.chunk(chunks)
    )
    return torch.cat(list(parts)).to(dtype)


def roi_align_matrix(
    rois: Tensor, feature_shape: Tuple[int, int, int], output_size: Tuple[int, int], spatial_scale: float,
    sampling_ratio: int, aligned: bool,
) -> Tensor:
    """Sparse (R*ph*pw, B*H*W) matrix of RoIAlign's interpolation weights; rois (R, 5) = (batch index, x1, y1, x2, y2)."""
    batch, height, width = feature_shape
    ph, pw = output_size
    grid = sampling_ratio
    offset = 0.5 if aligned else 0.0
    r = rois.shape[0]
    idx = rois[:, 0].long()
    x1, y1, x2, y2 = (rois[:, k] * spatial_scale - offset for k in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    # Sample coordinates (R, ph*grid) and (R, pw*grid): bin i, sub-sample k at (i + (k + 0.5) / grid) * bin size.
    steps_h = (torch.arange(ph * grid, device=rois.device, dtype=rois.dtype) + 0.5) / grid
    steps_w = (torch.arange(pw * grid, device=rois.device, dtype=rois.dtype) + 0.5) / grid
    ys = y1[:, None] + steps_h[None] * (roi_h / ph)[:, None]
    xs = x1[:, None] + steps_w[None] * (roi_w / pw)[:, None]

    def corners(v: Tensor, size: int):
        valid = (v >= -1.0) & (v <= size)
        v = v.clamp(min=0.0)
        low = v.floor().long()
        at_edge = low >= size - 1
        low = torch.where(at_edge, torch.full_like(low, size - 1), low)
        high = torch.where(at_edge, low, low + 1)
        frac = torch.where(at_edge, torch.zeros_like(v), v - low.to(v.dtype))
        return valid, low, high, frac

    vy, y_lo, y_hi, ly = corners(ys, height)
    vx, x_lo, x_hi, lx = corners(xs, width)
    # Broadcast to (R, ph*grid, pw*grid) sample points, 4 corners each.
    shape = (r, ph * grid, pw * grid)
    valid = (vy[:, :, None] & vx[:, None, :]).expand(shape)
    weights = torch.stack([
        (1 - ly)[:, :, None] * (1 - lx)[:, None, :], (1 - ly)[:, :, None] * lx[:, None, :],
        ly[:, :, None] * (1 - lx)[:, None, :], ly[:, :, None] * lx[:, None, :],
    ]) * valid / (grid * grid)
    base = (idx * (height * width))[:, None, None]
    cols = torch.stack([
        base + (y_lo * width)[:, :, None] + x_lo[:, None, :], base + (y_lo * width)[:, :, None] + x_hi[:, None, :],
        base + (y_hi * width)[:, :, None] + x_lo[:, None, :], base + (y_hi * width)[:, :, None] + x_hi[:, None, :],
    ]).expand(4, *shape)
    # Output bin of each sample point: (r, i, j) with i = sample row // grid, j = sample column // grid.
    bin_i = torch.arange(ph * grid, device=rois.device) // grid
    bin_j = torch.arange(pw * grid, device=rois.device) // grid
    rows = (torch.arange(r, device=rois.device)[:, None, None] * (ph * pw) + bin_i[None, :, None] * pw + bin_j[None, None, :])
    rows = rows.expand(4, *shape)
    indices = torch.stack([rows.reshape(-1), cols.reshape(-1)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*beta.*")
        return torch.sparse_coo_tensor(
            indices, weights.reshape(-1), (r * ph * pw, batch * height * width), check_invariants=False
        )


def _transposed_csr(matrix: Tensor) -> Tensor:
    """W^T in CSR from the uncoalesced COO matrix W, by one stable sort of the column indices.

    Repeated (row, column) entries (sample points of one bin sharing a corner) stay separate entries, which the
    CSR product sums; this skips the coalescing (sort and merge) of ``to_sparse_csr``.
    """
    (rows, cols), values = matrix._indices(), matrix._values()
    num_rows, num_cols = matrix.shape
    cols, order = torch.sort(cols, stable=True)
    crow = torch.zeros(num_cols + 1, dtype=torch.long, device=cols.device)
    crow[1:] = torch.bincount(cols, minlength=num_cols).cumsum(0)
    return torch.sparse_csr_tensor(crow, rows[order], values[order], (num_cols, num_rows), check_invariants=False)


class _RoIAlignFastBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (features.shape, output_size, spatial_scale, sampling_ratio, aligned)
        return parallel_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad_out):
        (rois,) = ctx.saved_tensors
        shape, output_size, spatial_scale, sampling_ratio, aligned = ctx.args
        b, c, h, w = shape
        # Sparse CPU kernels exist for float32/float64 only: reduced-precision gradients are accumulated in float32.
        dtype = grad_out.dtype if grad_out.dtype in (torch.float32, torch.float64) else torch.float32
        matrix = roi_align_matrix(rois.to(dtype), (b, h, w), output_size, spatial_scale, sampling_ratio, aligned)
        grad = grad_out.permute(0, 2, 3, 1).reshape(-1, c).to(dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*beta.*")
            grad_features = _transposed_csr(matrix) @ grad
        return grad_features.view(b, h, w, c).permute(0, 3, 1, 2).to(grad_out.dtype), None, None, None, None, None


def roi_align_fast_backward(
    features: Tensor, rois: Tensor, output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """torchvision.ops.roi_align (B, C, H, W), (R, 5) -> (R, C, ph, pw) with the sparse-matrix backward.

    Needs a fixed ``sampling_ratio`` > 0; rois must not require grad (DiffusionInst detaches its boxes).
    """
    if sampling_ratio <= 0:
        raise ValueError(f"the sparse RoIAlign backward needs POOLER_SAMPLING_RATIO > 0, got {sampling_ratio}")
    return _RoIAlignFastBackward.apply(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


class ROIAlignCPU(ROIAlign):
    """detectron2's ``ROIAlign`` (same arguments and outputs) with, on CPU, the parallel forward and the sparse
    backward; on other devices, or without a fixed sampling ratio, detectron2's own forward."""

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        if features.device.type != "cpu" or self.sampling_ratio <= 0:
            return super().forward(features, rois)
        output_size = self.output_size if isinstance(self.output_size, tuple) else (self.output_size,) * 2
        args = (rois.to(features.dtype), output_size, self.spatial_scale, self.sampling_ratio, self.aligned)
        if not features.requires_grad:
            return parallel_roi_align(features, *args)
        return roi_align_fast_backward(features, *args)
