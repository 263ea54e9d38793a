"""Timing and memory measurements of the benchmark: timed calls on a warm heap, peak RSS of one call from a trimmed
heap, and a breakdown of one inference call by wrapping the model's own calls (nothing re-implemented)."""
from __future__ import annotations

import contextlib
import resource
import statistics
import time
import types
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from diffusioninst.runtime import malloc_trim

TOP_PARTS = ("preprocess", "backbone_fpn", "mask_branch", "decoder", "after_decoder")  # sum to the call's total
SUB_PARTS = ("mask_head", "paste_masks")  # parts of after_decoder
PART_LABELS = {
    "preprocess": "preprocess (normalise, pad)",
    "backbone_fpn": "backbone + FPN",
    "mask_branch": "mask branch (F_mask)",
    "decoder": "decoder (all stages, all steps)",
    "after_decoder": "after decoder (rest)",
    "mask_head": "  of which mask head (phi)",
    "paste_masks": "  of which paste (resize, crop)",
    "total": "total",
}





def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _release_free_heap() -> None:
    """Return the C allocator's cached free memory to the OS (glibc malloc_trim), so it is not in a baseline."""
    malloc_trim()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not possible."""
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory over a block. CUDA: torch.cuda.max_memory_allocated. CPU: the kernel's peak RSS.

    On CPU the kernel's peak-RSS counter VmHWM is reset through /proc/self/clear_refs at the start, so the peak
    is the block's own, exact and without sampling; where that is not possible, getrusage's ru_maxrss (the process's
    high-water mark since start) is reported instead and says so. ``increase_mb`` is peak minus the value at
    the start (model weights and inputs are in the baseline); on CPU, free memory the allocator keeps despite
    malloc_trim is in the baseline too, so the increase can understate the working set.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.result: Dict[str, Any] = {}

    def __enter__(self) -> "PeakMemory":
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._method = "torch.cuda.max_memory_allocated (reset before the call)"
        elif _reset_peak_rss():
            self._base = _proc_status_kb("VmRSS") * 1024
            self._method = "peak RSS (VmHWM, reset via /proc/self/clear_refs before the call)"
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self._method = "ru_maxrss (process high-water mark since start; not resettable here)"
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._method.startswith("peak RSS"):
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mb = 1024.0**2
        self.result = {"peak_mb": peak / mb, "baseline_mb": self._base / mb,
                       "increase_mb": max(peak - self._base, 0) / mb, "method": self._method}


def summarize(times: Sequence[float], images_per_call: int) -> Dict[str, Any]:
    """Median, min/max and interquartile range of call times, and the derived per-image rates."""
    median = statistics.median(times)
    q1, q3 = statistics.quantiles(times, n=4, method="inclusive")[::2] if len(times) > 1 else (times[0], times[0])
    return {
        "calls": len(times), "times_s": list(times), "median_s": median, "min_s": min(times), "max_s": max(times),
        "q1_s": q1, "q3_s": q3, "ms_per_image": 1000.0 * median / images_per_call,
        "images_per_s": images_per_call / median,
    }


def timed_call(fn: Callable[[], Any], device: torch.device) -> Tuple[float, Any]:
    """One synchronised, timed call of fn: seconds and its output."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def memory_call(fn: Callable[[], Any], device: torch.device) -> Dict[str, Any]:
    """The PeakMemory result of one call of fn (not timed: on CPU it starts from a trimmed heap)."""
    with PeakMemory(device) as mem:
        fn()
    return mem.result


class PartTimer:
    """Accumulates the wall time of named calls (wrapped functions, module forwards); undoes its patches on exit."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: Dict[str, float] = defaultdict(float)
        self._starts: Dict[str, List[float]] = defaultdict(list)
        self._undo: List[Callable[[], None]] = []

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._starts[name].append(self.now())

    def stop(self, name: str) -> None:
        self.times[name] += self.now() - self._starts[name].pop()

    def wrap(self, owner: Any, attr: str, name: str) -> bool:
        """Time every call of owner.attr (a module-level function or a bound method); False if it is missing."""
        original = getattr(owner, attr, None)
        if original is None:
            return False
        had_own = isinstance(owner, types.ModuleType) or attr in vars(owner)

        def timed(*args, **kwargs):
            self.start(name)
            try:
                return original(*args, **kwargs)
            finally:
                self.stop(name)

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original) if had_own else delattr(owner, attr))
        return True

    def hook(self, module: nn.Module, name: str) -> None:
        """Time every forward of module with forward pre/post hooks."""
        pre = module.register_forward_pre_hook(lambda m, args: self.start(name))
        post = module.register_forward_hook(lambda m, args, out: self.stop(name))
        self._undo += [pre.remove, post.remove]

    def __enter__(self) -> "PartTimer":
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


@contextlib.contextmanager
def instrument_ours(model: nn.Module, timer: PartTimer) -> Iterator[None]:
    """Time the parts of DiffusionInst.inference: hooks and wrappers on the calls it makes, nothing re-implemented."""
    from diffusioninst.modeling import postprocess

    timer.wrap(model, "preprocess_image", "preprocess")
    timer.wrap(model, "extract_features", "_features")  # backbone + FPN (with layout conversions) + mask branch
    timer.wrap(model.head, "mask_features", "mask_branch")
    timer.hook(model.head, "decoder")  # head.forward: every stage, once per DDIM step
    timer.wrap(postprocess.DynamicMaskWindows, "window", "mask_head")  # called by masks_to_image, once per box
    timer.wrap(postprocess, "masks_to_image", "_masks")  # paste = this - mask head
    with timer:
        yield


@contextlib.contextmanager
def instrument_original(model: nn.Module, ref: types.ModuleType, timer: PartTimer) -> Iterator[None]:
    """Time the parts of original_release.original_inference by wrapping its helper functions (module ``ref``)."""
    timer.wrap(model, "preprocess_image", "preprocess")
    timer.hook(model.backbone, "backbone_fpn")
    timer.wrap(ref, "head_forward", "_head")  # mask branch + time MLP + stages; mask branch = this - stages
    timer.wrap(ref, "stage_forward", "decoder")
    timer.wrap(ref, "grouped_mask_head", "mask_head")
    timer.wrap(ref, "postprocess", "paste_masks")
    with timer:
        yield


def instrumented_call(fn: Callable[[], Any], instrument: Callable[[PartTimer], Any], device: torch.device) -> Dict[str, float]:
    """Seconds per part of one instrumented call; after_decoder is the call's total minus the other parts."""
    timer = PartTimer(device)
    with instrument(timer):
        t0 = timer.now()
        fn()
        total = timer.now() - t0
    parts = dict(timer.times)
    if not parts:  # one opaque call (the ONNX graph): its total only
        return {"total": total}
    if "_head" in parts:  # original: the head function holds the mask branch, the time MLP and the stages
        parts["mask_branch"] = max(parts.pop("_head") - parts.get("decoder", 0.0), 0.0)
    if "_features" in parts:  # ours: feature extraction holds the backbone and the mask branch
        parts["backbone_fpn"] = max(parts.pop("_features") - parts.get("mask_branch", 0.0), 0.0)
    if "_masks" in parts:  # ours: the mask head runs inside the paste, on the cells of each box
        parts["paste_masks"] = max(parts.pop("_masks") - parts.get("mask_head", 0.0), 0.0)
    parts["after_decoder"] = max(total - sum(parts.get(p, 0.0) for p in TOP_PARTS[:-1]), 0.0)
    parts["total"] = total
    return parts


def median_parts(runs: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Median milliseconds of each part over instrumented calls."""
    names = [n for n in (*TOP_PARTS, *SUB_PARTS, "total") if all(n in r for r in runs)]
    return {n: 1000.0 * statistics.median(r[n] for r in runs) for n in names}


