#!/usr/bin/env python
"""Time DiffusionInst inference (ours and the original release's code path) and training; print a table, write JSON.

  tools/benchmark.py --config-file CFG [--mode inference|train|all] [--batch-size 8] [--warmup 2] [--repeats 5]
                     [--image-size 800x1216 | --shapes] [--impl ours|original|both] [--json out.json] [KEY VALUE ...]

Inference: images/s and ms/image at batch 1 and at --batch-size (``model.inference`` in eval mode under no_grad),
after warm-up calls, over N timed calls (median, min/max, IQR), a breakdown of one call (preprocess,
backbone+FPN, mask branch, decoder over all DDIM steps, everything after the decoder) measured by wrapping the model's
own calls with timers in separate, instrumented calls, and peak memory from one more call per case. ``--impl original``
runs the original release's inference as re-stated in ``tests/reference_original.py`` (batch 1 only) on the same weights and initial
boxes. Training: s/iteration (forward, backward, optimizer step from ``diffusioninst.build_optimizer``) and peak memory
(one more iteration);
``--impl original`` trains with the original release's loss computation and optimizer as re-stated in the same file
(``original_training_forward``: per-image noising, matcher loops, losses, stock RoIAlign; ``original_optimizer``) on
the same model and batch.
Timed calls run as in a long evaluation or training loop: the C allocator keeps what earlier calls freed (with
MODEL.DEVICE cpu and CPU_KEEP_FREED_MEMORY, as tools/train_net.py and tools/demo.py set it up, for both code paths);
each memory call starts from a trimmed heap, so that its peak is its own.
Weights come from MODEL.WEIGHTS; with MODEL.WEIGHTS "" they are a random init, and the detection counts (hence the
post-processing time) are not those of a trained model.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import types
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import diffusioninst  # noqa: E402,F401  (compat shims and registrations come first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from torch import nn  # noqa: E402

from diffusioninst import (  # noqa: E402
    DiffusionInstDatasetMapper, add_diffusioninst_config, build_optimizer,
)
from diffusioninst.data import register_datasets_from_cfg  # noqa: E402
from diffusioninst.runtime import configure_runtime, malloc_trim  # noqa: E402
from diffusioninst.engine import training_amp_dtype  # noqa: E402

RANDOM_INSTANCES_PER_IMAGE = 5  # ground-truth instances of each random training image
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


# ----------------------------------------------------------------------------------------------------- setup


def setup_cfg(config_file: str, opts: Sequence[str]) -> CfgNode:
    """Frozen config from a file and KEY VALUE overrides, datasets registered (as tools/train_net.py setup())."""
    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list([str(o) for o in opts])
    register_datasets_from_cfg(cfg)
    cfg.freeze()
    return cfg


def build_benchmark_model(cfg: CfgNode, seed: int = 0) -> nn.Module:
    """The model of cfg in eval mode, with MODEL.WEIGHTS loaded or (if empty) a seeded random init."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def parse_size(text: str) -> Tuple[int, int]:
    """'HxW' -> (H, W)."""
    h, w = text.lower().split("x")
    return int(h), int(w)


def environment(cfg: CfgNode) -> Dict[str, Any]:
    """Software, machine and thread settings of this run."""
    import detectron2

    env = {
        "device": cfg.MODEL.DEVICE,
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "git_commit": _git_commit(),
    }
    if cfg.MODEL.DEVICE.startswith("cuda"):
        env["cuda_device"] = torch.cuda.get_device_name(torch.device(cfg.MODEL.DEVICE))
        env["cuda_version"] = torch.version.cuda
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------- inputs


def random_images(n: int, size: Tuple[int, int], seed: int = 0) -> List[Dict[str, Any]]:
    """n model inputs with random uint8 images of size (H, W)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    return [
        {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "height": h, "width": w,
         "image_id": i}
        for i in range(n)
    ]


def random_training_inputs(n: int, size: Tuple[int, int], num_classes: int, seed: int = 0) -> List[Dict[str, Any]]:
    """n training inputs: random images with RANDOM_INSTANCES_PER_IMAGE random boxes, classes and box-shaped masks."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    inputs = random_images(n, size, seed)
    for x in inputs:
        k = RANDOM_INSTANCES_PER_IMAGE
        xy0 = torch.rand(k, 2, generator=g) * 0.7
        wh = 0.1 + torch.rand(k, 2, generator=g) * 0.2
        boxes = torch.cat([xy0, xy0 + wh], dim=1) * torch.tensor([w, h, w, h], dtype=torch.float32)
        masks = torch.zeros(k, h, w, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            m[y0:y1, x0:x1] = True
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (k,), generator=g)
        inst.gt_masks = BitMasks(masks)
        x["instances"] = inst
    return inputs


def shapes_inputs(cfg: CfgNode, n: int, is_train: bool, seed: int = 0) -> List[Dict[str, Any]]:
    """n inputs from shapes_val (inference) or shapes_train (training) through DiffusionInstDatasetMapper."""
    dicts = DatasetCatalog.get("shapes_train" if is_train else "shapes_val")
    mapper = DiffusionInstDatasetMapper(cfg, is_train=is_train)
    torch.manual_seed(seed)  # the augmentations draw from torch, numpy and python RNGs
    random.seed(seed)
    np.random.seed(seed)
    return [mapper(dicts[i % len(dicts)]) for i in range(n)]


def describe_inputs(inputs: Sequence[Dict[str, Any]]) -> str:
    """'3x800x1216 uint8' style summary of the distinct image shapes."""
    shapes = sorted({"x".join(map(str, x["image"].shape)) for x in inputs})
    return ", ".join(shapes) + f" {inputs[0]['image'].dtype}".replace("torch.", "")


# ----------------------------------------------------------------------------------------------------- timing


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
    """Time the parts of reference_original.original_inference by wrapping its helper functions."""
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


# ----------------------------------------------------------------------------------------------------- benchmarks


def _num_detections(out: Any) -> float:
    """Mean detections per image of an inference output (a list of {"instances"} dicts, or one Instances)."""
    if isinstance(out, Instances):
        return float(len(out))
    return statistics.mean(len(o["instances"]) for o in out)


def load_reference() -> types.ModuleType:
    """tests/reference_original.py, the re-statement of the original release's inference path."""
    tests_dir = os.path.join(ROOT, "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import reference_original

    return reference_original


def inference_cases(
    model: nn.Module, cfg: CfgNode, inputs: Sequence[Dict[str, Any]], impls: Sequence[str], batch_sizes: Sequence[int],
    seed: int = 0,
) -> List[Dict[str, Any]]:
    """One case per implementation and batch size (original: batch 1 only): a call and its instrumentation."""
    device = model.device
    d = cfg.MODEL.DiffusionInst
    init = torch.randn(max(batch_sizes), model.num_proposals, 4, generator=torch.Generator().manual_seed(seed)).to(device)
    cases = []
    for impl in impls:
        for bs in batch_sizes:
            batch = [inputs[i % len(inputs)] for i in range(bs)]
            if impl == "ours":
                def fn(batch=batch, bs=bs):
                    with torch.no_grad():
                        return model.inference(batch, init_boxes=init[:bs])

                def instrument(timer):
                    return instrument_ours(model, timer)
            elif bs == 1:
                ref = load_reference()
                # The reference makes its noise and time tensors on the default device.
                default_device = torch.device(device) if device.type != "cpu" else contextlib.nullcontext()

                def fn(x=batch[0], ref=ref, default_device=default_device):
                    with torch.no_grad(), default_device:
                        return ref.original_inference(model, x, init[:1], sample_steps=d.SAMPLE_STEP,
                                                      box_renewal=d.BOX_RENEWAL, ensemble=d.USE_ENSEMBLE, eta=d.DDIM_ETA)

                def instrument(timer, ref=ref):
                    return instrument_original(model, ref, timer)
            else:
                continue
            cases.append({"impl": impl, "batch_size": bs, "fn": fn, "instrument": instrument})
    return cases


def bench_inference(
    model: nn.Module, cfg: CfgNode, inputs: Sequence[Dict[str, Any]], impls: Sequence[str], batch_sizes: Sequence[int],
    warmup: int, repeats: int, seed: int = 0,
) -> List[Dict[str, Any]]:
    """Timed inference of every case, then a breakdown of each from as many instrumented calls.

    Calls of the cases are interleaved (warm-up of all, then round r of every case, ...) so that a change in
    the machine's load during the run affects every case alike and the speed-up ratio stays fair.
    """
    device = model.device
    cases = inference_cases(model, cfg, inputs, impls, batch_sizes, seed)
    for _ in range(warmup):
        for case in cases:
            case["fn"]()
    times: Dict[int, List[float]] = defaultdict(list)
    outputs: Dict[int, Any] = {}
    for _ in range(repeats):
        for i, case in enumerate(cases):
            seconds, outputs[i] = timed_call(case["fn"], device)
            times[i].append(seconds)
    parts: Dict[int, List[Dict[str, float]]] = defaultdict(list)
    for _ in range(repeats):
        for i, case in enumerate(cases):
            parts[i].append(instrumented_call(case["fn"], case["instrument"], device))
    memory = [memory_call(case["fn"], device) for case in cases]
    return [
        {"impl": case["impl"], "batch_size": case["batch_size"], **summarize(times[i], case["batch_size"]),
         "memory": memory[i], "detections_per_image": _num_detections(outputs[i]),
         "breakdown_ms": median_parts(parts[i]),
         "breakdown_runs_ms": [{k: 1000.0 * v for k, v in run.items()} for run in parts[i]]}
        for i, case in enumerate(cases)
    ]


def train_forwards(
    model: nn.Module, inputs: Sequence[Dict[str, Any]], impls: Sequence[str]
) -> Dict[str, Callable[[], Dict[str, torch.Tensor]]]:
    """Per implementation, a training forward on the batch -> weighted losses (both include the noising of boxes)."""
    forwards: Dict[str, Callable[[], Dict[str, torch.Tensor]]] = {}
    for impl in impls:
        if impl == "ours":
            forwards[impl] = lambda: model(list(inputs))
        else:
            ref = load_reference()
            forwards[impl] = lambda ref=ref: ref.original_training_forward(model, list(inputs))
    return forwards


def bench_train(
    model: nn.Module, cfg: CfgNode, inputs: Sequence[Dict[str, Any]], warmup: int, repeats: int,
    impls: Sequence[str] = ("ours",),
) -> Dict[str, Dict[str, Any]]:
    """Timed training iterations of each implementation on one fixed batch: forward (losses summed), backward, step.

    With SOLVER.AMP.ENABLED the forwards run under autocast with SOLVER.AMP.DTYPE (no loss scaling).
    Every implementation trains the same model, with its own optimizer: ``diffusioninst.build_optimizer`` for ours,
    the original release's construction (``original_optimizer``) for the original. Their iterations are interleaved
    (warm-up of all, then round r of each, ...) so that a change in the machine's load affects them alike. Returns
    one entry per implementation, keyed by its name.
    """
    device = model.device
    optimizers = {impl: build_optimizer(cfg, model) if impl == "ours" else load_reference().original_optimizer(cfg, model)
                  for impl in impls}
    forwards = train_forwards(model, inputs, impls)
    split: Dict[str, Dict[str, List[float]]] = {impl: defaultdict(list) for impl in impls}

    amp_dtype = training_amp_dtype(cfg)  # as tools/train_net.py trains (loss scaling aside), for both code paths

    def step(impl: str, record: bool = True) -> float:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = forwards[impl]()
            total = sum(losses.values())
        synchronize(device)
        t1 = time.perf_counter()
        optimizers[impl].zero_grad()
        total.backward()
        synchronize(device)
        t2 = time.perf_counter()
        optimizers[impl].step()
        synchronize(device)
        t3 = time.perf_counter()
        if record:
            split[impl]["forward"].append(t1 - t0)
            split[impl]["backward"].append(t2 - t1)
            split[impl]["optimizer_step"].append(t3 - t2)
        return float(total.detach())

    runs: Dict[str, List[Tuple[float, Any]]] = defaultdict(list)
    model.train()
    try:
        for _ in range(warmup):
            for impl in impls:
                step(impl, record=False)
        for _ in range(repeats):
            for impl in impls:
                runs[impl].append(timed_call(lambda impl=impl: step(impl), device))
        memory = {impl: memory_call(lambda impl=impl: step(impl, record=False), device) for impl in impls}
    finally:
        model.eval()
    entries = {}
    for impl in impls:
        entry = {"impl": impl, "batch_size": len(inputs), **summarize([r[0] for r in runs[impl]], len(inputs)),
                 "memory": memory[impl], "last_loss": runs[impl][-1][1]}
        entry["s_per_iter"] = entry["median_s"]
        entry["split_ms"] = {k: 1000.0 * statistics.median(v) for k, v in split[impl].items()}
        entries[impl] = entry
    return entries


def run_benchmark(
    config_file: str,
    opts: Sequence[str] = (),
    mode: str = "inference",
    impl: str = "ours",
    batch_size: int = 8,
    warmup: int = 2,
    repeats: int = 5,
    image_size: Tuple[int, int] = (800, 1216),
    shapes: bool = False,
    threads: Optional[int] = None,
    seed: int = 0,
) -> Dict[str, Any]:
    """Build the model of config_file + opts and run the requested measurements; a JSON-ready dict."""
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("need repeats >= 1, warmup >= 0, batch_size >= 1")
    if threads:
        torch.set_num_threads(threads)
    cfg = setup_cfg(config_file, opts)
    keeps_freed = configure_runtime(cfg)
    model = build_benchmark_model(cfg, seed)
    d = cfg.MODEL.DiffusionInst
    results: Dict[str, Any] = {
        "config_file": config_file,
        "overrides": [str(o) for o in opts],
        "weights": cfg.MODEL.WEIGHTS or "random init (MODEL.WEIGHTS empty)",
        "environment": {**environment(cfg), "cpu_allocator": "freed memory kept (CPU_KEEP_FREED_MEMORY)"
                        if keeps_freed else "C library default"},
        "settings": {
            "mode": mode, "impl": impl, "batch_size": batch_size, "warmup": warmup, "repeats": repeats,
            "inputs": "shapes" if shapes else f"random uint8 {image_size[0]}x{image_size[1]}",
            "num_proposals": d.NUM_PROPOSALS, "sample_steps": d.SAMPLE_STEP, "num_stages": d.NUM_HEADS,
            "num_classes": d.NUM_CLASSES, "detections_per_image_cap": cfg.TEST.DETECTIONS_PER_IMAGE,
            "backbone": cfg.MODEL.BACKBONE.NAME
            + (f" depth {cfg.MODEL.RESNETS.DEPTH}" if "resnet" in cfg.MODEL.BACKBONE.NAME else ""),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    }
    if mode in ("inference", "all"):
        impls = ["ours", "original"] if impl == "both" else [impl]
        batch_sizes = sorted({1, batch_size})
        inputs = shapes_inputs(cfg, batch_size, False, seed) if shapes else random_images(batch_size, image_size, seed)
        results["settings"]["inference_inputs"] = describe_inputs(inputs)
        results["inference"] = bench_inference(model, cfg, inputs, impls, batch_sizes, warmup, repeats, seed)
        by_impl = {e["impl"]: e for e in results["inference"] if e["batch_size"] == 1}
        if len(by_impl) == 2:
            results["speedup_batch1"] = by_impl["original"]["median_s"] / by_impl["ours"]["median_s"]
    if mode in ("train", "all"):
        if shapes:
            train_inputs = shapes_inputs(cfg, batch_size, True, seed)
        else:
            train_inputs = random_training_inputs(batch_size, image_size, d.NUM_CLASSES, seed)
        results["settings"]["train_inputs"] = describe_inputs(train_inputs)
        impls = ["ours", "original"] if impl == "both" else [impl]
        entries = bench_train(model, cfg, train_inputs, warmup, repeats, impls)
        for name, key in (("ours", "train"), ("original", "train_original")):
            if name in entries:
                results[key] = entries[name]
        if len(entries) == 2:
            results["speedup_train"] = entries["original"]["median_s"] / entries["ours"]["median_s"]
    return results


# ----------------------------------------------------------------------------------------------------- report


def _fmt_ms(seconds: float) -> str:
    return f"{1000.0 * seconds:.1f}"


def format_report(results: Dict[str, Any]) -> str:
    """The measurements as plain-text tables."""
    env, s = results["environment"], results["settings"]
    lines = [
        f"DiffusionInst benchmark: {results['config_file']} {' '.join(results['overrides'])}".rstrip(),
        f"device {env['device']}{' (' + env['cuda_device'] + ')' if 'cuda_device' in env else ''}, "
        f"torch {env['torch']}, torch threads {env['torch_threads']}, {env['cpu_count']} CPUs ({env['cpu_model']}), "
        f"commit {env['git_commit']}, allocator: {env['cpu_allocator']}",
        f"weights: {results['weights']}; {s['backbone']}, {s['parameters'] / 1e6:.1f}M parameters, "
        f"{s['num_proposals']} proposals, {s['num_stages']} stages, {s['sample_steps']} DDIM step(s), "
        f"{s['num_classes']} classes, "
        + (f"cap {s['detections_per_image_cap']} detections" if s["detections_per_image_cap"] > 0 else "no detection cap"),
        f"warm-up {s['warmup']}, timed calls {s['repeats']} per case, the cases' calls interleaved; "
        "times: median [min..max]; memory from one more call each",
    ]
    if results["weights"].startswith("random"):
        lines.append("random weights: the detection counts, hence the post-processing time, are not a trained model's")
    if "inference" in results:
        memory = results["inference"][0]["memory"]["method"]
        lines += ["", f"Inference on {s['inference_inputs']} (memory: {memory}; +MB: peak minus the value before the call)",
                  f"{'impl':<9}{'batch':>6}{'ms/image':>11}{'images/s':>10}{'ms/call [min..max]':>28}"
                  f"{'peak MB':>10}{'+MB':>8}{'dets/img':>10}"]
        for e in results["inference"]:
            call = f"{_fmt_ms(e['median_s'])} [{_fmt_ms(e['min_s'])}..{_fmt_ms(e['max_s'])}]"
            lines.append(f"{e['impl']:<9}{e['batch_size']:>6}{e['ms_per_image']:>11.1f}{e['images_per_s']:>10.3f}"
                         f"{call:>28}{e['memory']['peak_mb']:>10.0f}{e['memory']['increase_mb']:>8.0f}"
                         f"{e['detections_per_image']:>10.1f}")
        if "speedup_batch1" in results:
            lines.append(f"speed-up at batch 1 (original / ours, same run, same weights and initial boxes): "
                         f"{results['speedup_batch1']:.2f}x")
        lines += _format_breakdowns(results["inference"])
    train = [results[k] for k in ("train", "train_original") if k in results]
    if train:
        lines += ["", f"Training on {s['train_inputs']}, batch {train[0]['batch_size']} "
                  f"(memory: {train[0]['memory']['method']}; +MB: peak minus the value before the iteration)",
                  f"{'impl':<9}{'s/iter [min..max]':>24}{'forward ms':>12}{'backward ms':>13}{'step ms':>9}"
                  f"{'peak MB':>10}{'+MB':>8}{'loss':>9}"]
        for t in train:
            sp = t["split_ms"]
            it = f"{t['median_s']:.3f} [{t['min_s']:.3f}..{t['max_s']:.3f}]"
            lines.append(f"{t['impl']:<9}{it:>24}{sp['forward']:>12.0f}{sp['backward']:>13.0f}"
                         f"{sp['optimizer_step']:>9.0f}{t['memory']['peak_mb']:>10.0f}"
                         f"{t['memory']['increase_mb']:>8.0f}{t['last_loss']:>9.3f}")
        if "speedup_train" in results:
            lines.append(f"speed-up of a training iteration (original / ours, same run, same model and batch, each with "
                         f"its own optimizer): {results['speedup_train']:.2f}x")
    return "\n".join(lines)


def _format_breakdowns(entries: Sequence[Dict[str, Any]]) -> List[str]:
    columns = [(f"{e['impl']} b{e['batch_size']}", e["breakdown_ms"]) for e in entries]
    lines = ["", "Breakdown of one call (ms, median of the instrumented calls; % of that total)",
             f"{'part':<34}" + "".join(f"{name:>22}" for name, _ in columns)]
    for part in (*TOP_PARTS, *SUB_PARTS, "total"):
        row = f"{PART_LABELS[part]:<34}"
        for _, b in columns:
            if part in b:
                pct = 100.0 * b[part] / b["total"] if b["total"] > 0 else 0.0
                row += f"{b[part]:>13.1f} ({pct:5.1f}%)"
            else:
                row += f"{'-':>22}"
        lines.append(row)
    return lines


# ----------------------------------------------------------------------------------------------------- CLI


def get_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--mode", choices=("inference", "train", "all"), default="inference")
    parser.add_argument("--impl", choices=("ours", "original", "both"), default="ours",
                        help="code path: this package's, the original release's (inference: batch 1), or both")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="inference batch besides batch 1 (always timed); the training batch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls (and as many instrumented calls for the breakdown)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image-size", type=parse_size, default=(800, 1216), metavar="HxW",
                        help="random uint8 images of this size (training: with random boxes and masks)")
    source.add_argument("--shapes", action="store_true",
                        help="real images: shapes_val / shapes_train through DiffusionInstDatasetMapper")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="weights init, inputs and initial boxes")
    parser.add_argument("--json", metavar="FILE", help="write every measurement here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark from command-line arguments, print the tables and write the JSON."""
    args = get_parser().parse_args(argv)
    results = run_benchmark(args.config_file, args.opts, args.mode, args.impl, args.batch_size, args.warmup,
                            args.repeats, args.image_size, args.shapes, args.threads, args.seed)
    print(format_report(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, allow_nan=False)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
