#!/usr/bin/env python
"""Check this codebase on the GPU of this machine in one command (``make gpu-check``); print one table.

Where CUDA is present, in about 5 minutes on one GPU:
  1. the tests marked ``cuda`` (``pytest -m cuda``);
  2. CPU against CUDA inference of the COCO R50 config, same random weights and initial boxes, 1 and 4 steps (the
     later steps' noise passed explicitly): the same detections within float tolerance (TF32 off);
  3. 20 float16-AMP training iterations (GradScaler) of the shapes config on the shapes data (generated on first
     use): finite losses whose last five average below the first five;
  4. with two GPUs or more: a 2-process DDP training run (``tools/train_net.py --num-gpus 2``, NCCL);
  5. the benchmark (``benchmarks``): COCO R50 inference at 800x1216, batch 1 and 8, without and with
     ``TEST.COMPILE``: images/s, peak GPU memory, and kernel-launching ops and host syncs per image
     (``benchmarks/count_ops.py``; eager only).
Where there is no GPU it says so and exits 0. Exit status 1 if a check fails. Public torch API only.

  tools/gpu_check.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R50 = os.path.join(ROOT, "configs", "diffinst.coco.res50.5x.yaml")
SHAPES = os.path.join(ROOT, "configs", "diffinst.shapes.res18.cpu.yaml")
Row = Tuple[str, bool, str]  # check, passed, what was measured


def run_cuda_tests() -> Row:
    """``pytest -m cuda`` in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return "tests marked cuda", proc.returncode == 0, last


def _detections(model: torch.nn.Module, image: Dict[str, Any], init: torch.Tensor,
                step_noise: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = model.inference([image], init_boxes=init.to(model.device),
                          step_noise=None if step_noise is None else step_noise.to(model.device))[0]["instances"]
    return {"boxes": out.pred_boxes.tensor.cpu(), "scores": out.scores.cpu(), "classes": out.pred_classes.cpu(),
            "masks": out.pred_masks.cpu()}


def match_detections(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], box_tol: float = 0.5,
                     score_tol: float = 1e-3) -> float:
    """Fraction of a's detections with a detection in b of the same class, its box within ``box_tol`` pixels, its
    score within ``score_tol`` and mask IoU >= 0.9 (near-tied scores may swap the order between devices)."""
    if len(a["scores"]) == 0:
        return 1.0 if len(b["scores"]) == 0 else 0.0
    matched = 0
    for i in range(len(a["scores"])):
        close = ((b["boxes"] - a["boxes"][i]).abs().amax(1) <= box_tol) & (b["classes"] == a["classes"][i]) & (
            (b["scores"] - a["scores"][i]).abs() <= score_tol)
        for j in close.nonzero().flatten().tolist():
            inter = (a["masks"][i] & b["masks"][j]).sum().item()
            union = (a["masks"][i] | b["masks"][j]).sum().item()
            if union == 0 or inter / union >= 0.9:
                matched += 1
                break
    return matched / len(a["scores"])


def check_cpu_vs_cuda() -> List[Row]:
    """The same weights, image and noise on CPU (plain path, CPU_KERNELS False) and on CUDA, 1 and 4 steps."""
    from benchmarks.runs import build_benchmark_model, random_images, setup_cfg

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    image = random_images(1, (512, 672))[0]
    for steps in (1, 4):
        models = {}
        for device in ("cpu", "cuda"):
            cfg = setup_cfg(R50, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "MODEL.DiffusionInst.CPU_KERNELS",
                                  False, "MODEL.DiffusionInst.SAMPLE_STEP", steps])
            models[device] = build_benchmark_model(cfg, seed=0)
        g = torch.Generator().manual_seed(0)
        n = models["cpu"].num_proposals
        init = torch.randn(1, n, 4, generator=g)
        noise = torch.randn(steps - 1, 2, 1, n, 4, generator=g) if steps > 1 else None
        with torch.no_grad():
            cpu, cuda = (_detections(models[d], image, init, noise) for d in ("cpu", "cuda"))
        fraction = min(match_detections(cpu, cuda), match_detections(cuda, cpu))
        rows.append((f"CPU vs CUDA inference, {steps} step(s)", fraction >= 0.95,
                     f"{len(cpu['scores'])} / {len(cuda['scores'])} detections, {100 * fraction:.1f}% matched"))
    torch.backends.cudnn.allow_tf32 = True
    return rows


def check_amp_training(iterations: int = 20) -> Row:
    """float16 autocast with GradScaler on the shapes data: finite losses, the last five below the first five."""
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model

    from benchmarks.runs import setup_cfg
    from diffusioninst import DiffusionInstDatasetMapper, build_optimizer

    # shapes_train is generated under $DETECTRON2_DATASETS (default datasets/) on first use if it is missing.
    cfg = setup_cfg(SHAPES, ["MODEL.DEVICE", "cuda", "MODEL.WEIGHTS", "", "SOLVER.IMS_PER_BATCH", 8,
                             "SOLVER.BASE_LR", 3e-4, "SOLVER.WARMUP_ITERS", 0, "DATALOADER.NUM_WORKERS", 0])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda")
    loader = iter(build_detection_train_loader(cfg, mapper=DiffusionInstDatasetMapper(cfg, is_train=True)))
    batches = [next(loader) for _ in range(4)]
    losses = []
    for it in range(iterations):
        with torch.autocast("cuda", dtype=torch.float16):
            total = sum(model(batches[it % len(batches)]).values())
        optimizer.zero_grad()
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(total))
    finite = all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    return (f"{iterations} float16-AMP training iterations", finite and last < first,
            f"loss {first:.3f} (first 5) -> {last:.3f} (last 5), all finite: {finite}")


def check_ddp() -> Row:
    """A 2-process DDP run of tools/train_net.py on the shapes data (needs two GPUs)."""
    if torch.cuda.device_count() < 2:
        return "2-process DDP", True, f"skipped: {torch.cuda.device_count()} GPU"
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "tools/train_net.py", "--num-gpus", "2", "--config-file", SHAPES,
                               "MODEL.DEVICE", "cuda", "MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "10",
                               "SOLVER.IMS_PER_BATCH", "4", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", out],
                              cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return "2-process DDP (10 iterations)", proc.returncode == 0, "ok" if proc.returncode == 0 else tail[-200:]


def benchmark(quick: bool) -> List[Row]:
    """Images/s and peak GPU memory at batch 1 and 8, eager and TEST.COMPILE; kernel ops per image (eager)."""
    from benchmarks import run_benchmark
    from benchmarks.count_ops import run_count_ops

    rows = []
    base = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cuda"]
    counts = run_count_ops(R50, base, "inference", "ours", 8, (800, 1216))["inference"]
    ops = {e["batch_size"]: e for e in counts}
    for compile_ in (False, True):
        results = run_benchmark(R50, base + ["TEST.COMPILE", compile_], "inference", "ours", 8,
                                warmup=1 if quick else 2, repeats=3 if quick else 5)
        for e in results["inference"]:
            bs = e["batch_size"]
            detail = f"{e['images_per_s']:.1f} images/s, peak {e['memory']['peak_mb']:.0f} MB"
            if not compile_:
                detail += (f", {ops[bs]['kernel_ops_per_image']:.0f} kernel ops and "
                           f"{ops[bs]['host_syncs_per_image']:.1f} host syncs per image")
            rows.append((f"R50 inference 800x1216, batch {bs}{', TEST.COMPILE' if compile_ else ''}", True, detail))
    return rows


def format_table(rows: Sequence[Row], seconds: float) -> str:
    """The checks as a markdown table, with the GPU and the total time."""
    lines = [f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
             f"{seconds:.0f} s", "", "| check | result | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'pass' if ok else 'FAIL'} | {detail} |" for name, ok, detail in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed benchmark calls")
    parser.add_argument("--json", metavar="FILE", help="also write the table's rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU on this machine (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}); nothing to check")
        return 0
    import diffusioninst  # noqa: F401  (compat shims and registrations)

    start = time.perf_counter()
    checks: List[Callable[[], Any]] = [run_cuda_tests, check_cpu_vs_cuda, check_amp_training, check_ddp,
                                       lambda: benchmark(args.quick)]
    rows: List[Row] = []
    for check in checks:
        try:
            result = check()
        except Exception as exc:  # a failing check is a row of the table, the others still run
            result = (getattr(check, "__name__", "benchmark"), False, f"{type(exc).__name__}: {exc}"[:300])
        rows.extend(result if isinstance(result, list) else [result])
    print(format_table(rows, time.perf_counter() - start))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"check": n, "passed": ok, "measured": d} for n, ok, d in rows], f, indent=2)
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
