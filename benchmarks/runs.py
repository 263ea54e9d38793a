"""The benchmark's runs: the model and inputs of a config, inference and training cases of this package's code path and
of the original release's (``benchmarks.original_release``), interleaved on the same weights and inputs."""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import subprocess
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from torch import nn

from diffusioninst import DiffusionInstDatasetMapper, build_optimizer, get_diffusioninst_cfg

from . import original_release
from diffusioninst.data import register_datasets_from_cfg
from diffusioninst.engine import training_amp_dtype
from diffusioninst.runtime import configure_runtime
from .measure import (
    instrument_ours, instrument_original, instrumented_call, median_parts, memory_call,
    summarize, synchronize, timed_call,
)

RANDOM_INSTANCES_PER_IMAGE = 5  # ground-truth instances of each random training image
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




def setup_cfg(config_file: str, opts: Sequence[str]) -> CfgNode:
    """Frozen config from a file and KEY VALUE overrides, datasets registered (as tools/train_net.py setup())."""
    cfg = get_diffusioninst_cfg(config_file, [str(o) for o in opts])
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
    """'HxW' -> (H, W), both positive integers; anything else is an argparse error naming the value."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers (e.g. 800x1216), got {text!r}")
    return h, w


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
        out = subprocess.run(["git", "-C", _REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", _REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None




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




def _num_detections(out: Any) -> float:
    """Mean detections per image of an inference output (a list of {"instances"} dicts, or one Instances)."""
    if isinstance(out, Instances):
        return float(len(out))
    if isinstance(out, list) and out and isinstance(out[0], np.ndarray):  # onnxruntime: boxes, scores, classes, masks
        return float(len(out[0]))
    return statistics.mean(len(o["instances"]) for o in out)


def inference_cases(
    model: nn.Module, cfg: CfgNode, inputs: Sequence[Dict[str, Any]], impls: Sequence[str], batch_sizes: Sequence[int],
    seed: int = 0,
) -> List[Dict[str, Any]]:
    """One case per implementation and batch size (original and onnx: batch 1 only): a call and its instrumentation
    (the ONNX graph is one call: no breakdown)."""
    device = model.device
    d = cfg.MODEL.DiffusionInst
    init = torch.randn(max(batch_sizes), model.num_proposals, 4, generator=torch.Generator().manual_seed(seed)).to(device)
    cases = []
    for impl in impls:
        for bs in batch_sizes:
            batch = [inputs[i % len(inputs)] for i in range(bs)]
            if impl == "onnx" and bs == 1:
                fn = _onnx_call(model, cfg, batch[0]["image"], init[:1])

                def instrument(timer):
                    return contextlib.nullcontext()
            elif impl == "ours":
                def fn(batch=batch, bs=bs):
                    with torch.no_grad():
                        return model.inference(batch, init_boxes=init[:bs])

                def instrument(timer):
                    return instrument_ours(model, timer)
            elif impl == "original" and bs == 1:
                ref = original_release.inference  # the module whose helpers the instrumentation wraps
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


def _onnx_call(model: nn.Module, cfg: CfgNode, image: torch.Tensor, init: torch.Tensor) -> Callable[[], Any]:
    """A call of ``model`` exported to ONNX (on ``image``'s size) run by onnxruntime with torch's thread count."""
    import tempfile

    import onnxruntime

    from diffusioninst.export import export_onnx

    steps = len(model.sampler.time_pairs)
    if steps > 1:
        raise ValueError(f"--impl onnx times one sampling step (SAMPLE_STEP is {steps})")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        export_onnx(model, cfg, path, image[None].float().cpu())
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {"image": image[None].float().cpu().numpy(), "init_boxes": init.cpu().numpy()}
    return lambda: session.run(None, feeds)


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
            forwards[impl] = lambda: original_release.original_training_forward(model, list(inputs))
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
    optimizers = {impl: build_optimizer(cfg, model) if impl == "ours" else
                  original_release.original_optimizer(cfg, model) for impl in impls}
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
        impls = {"both": ["ours", "original"], "onnx": ["ours", "onnx"]}.get(impl, [impl])
        batch_sizes = sorted({1, batch_size})
        inputs = shapes_inputs(cfg, batch_size, False, seed) if shapes else random_images(batch_size, image_size, seed)
        results["settings"]["inference_inputs"] = describe_inputs(inputs)
        results["inference"] = bench_inference(model, cfg, inputs, impls, batch_sizes, warmup, repeats, seed)
        by_impl = {e["impl"]: e for e in results["inference"] if e["batch_size"] == 1}
        if "original" in by_impl and "ours" in by_impl:
            results["speedup_batch1"] = by_impl["original"]["median_s"] / by_impl["ours"]["median_s"]
        if "onnx" in by_impl and "ours" in by_impl:
            results["onnx_speedup_batch1"] = by_impl["ours"]["median_s"] / by_impl["onnx"]["median_s"]
    if mode in ("train", "all") and impl != "onnx":
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


