"""The benchmark (benchmarks, tools/benchmark.py) on the tiny shapes model: structure and sanity of the
results, not speed."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from conftest import CONFIGS, ROOT, TINY_OPTS, tiny_cfg
import benchmarks as bench
from diffusioninst.modeling.meta_arch import DiffusionInst

pytestmark = pytest.mark.slow  # runs the benchmark end to end

CONFIG = str(CONFIGS / "diffinst.shapes.res18.cpu.yaml")
BENCHMARK = str(ROOT / "tools" / "benchmark.py")

EXPECTED_CASES = {("ours", 1), ("ours", 2), ("original", 1)}


@pytest.fixture
def one_thread():
    """One torch thread while the test runs (on a shared machine more threads only add contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _non_negative(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def check_breakdown(b: dict, tol_ms: float = 0.05) -> None:
    """Every part present, finite and >= 0; top-level parts sum to no more than the total, sub-parts fit inside."""
    assert set(bench.TOP_PARTS) | set(bench.SUB_PARTS) | {"total"} <= set(b), b
    assert all(_non_negative(v) for v in b.values()), b
    assert _positive(b["total"]) and _positive(b["backbone_fpn"]) and _positive(b["decoder"]), b
    assert sum(b[p] for p in bench.TOP_PARTS) <= b["total"] * 1.01 + tol_ms, b
    assert b["mask_head"] + b["paste_masks"] <= b["after_decoder"] * 1.01 + tol_ms, b


def check_results(results: dict, batch_size: int = 2) -> None:
    """The JSON of a --mode all --impl both run: settings, environment and positive, finite measurements."""
    json.dumps(results, allow_nan=False)  # serialisable, no NaN/inf anywhere
    assert {"config_file", "overrides", "weights", "environment", "settings", "inference", "speedup_batch1",
            "train"} <= set(results)
    assert results["weights"].startswith("random init")
    env = results["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and _positive(env["torch_threads"])
    assert results["settings"]["num_proposals"] == 20 and results["settings"]["batch_size"] == batch_size

    assert {(e["impl"], e["batch_size"]) for e in results["inference"]} == EXPECTED_CASES
    for e in results["inference"]:
        assert e["calls"] == 1 and len(e["times_s"]) == 1
        assert all(_positive(e[k]) for k in ("median_s", "min_s", "max_s", "q1_s", "q3_s", "ms_per_image", "images_per_s"))
        assert e["min_s"] <= e["median_s"] <= e["max_s"]
        assert math.isclose(e["ms_per_image"], 1000 * e["median_s"] / e["batch_size"])
        assert _positive(e["memory"]["peak_mb"]) and _non_negative(e["memory"]["increase_mb"]) and e["memory"]["method"]
        assert _non_negative(e["detections_per_image"])
        check_breakdown(e["breakdown_ms"])
    assert _positive(results["speedup_batch1"])

    check_train_entry(results["train"], "ours", batch_size, calls=1)
    check_train_entry(results["train_original"], "original", batch_size, calls=1)
    assert math.isclose(results["speedup_train"], results["train_original"]["median_s"] / results["train"]["median_s"])


def check_train_entry(t: dict, impl: str, batch_size: int, calls: int) -> None:
    """One implementation's training timing: positive, finite times, split parts within the iteration, memory."""
    assert t["impl"] == impl and t["calls"] == calls and len(t["times_s"]) == calls
    assert t["batch_size"] == batch_size and _positive(t["s_per_iter"]) and math.isfinite(t["last_loss"])
    assert t["s_per_iter"] == t["median_s"] and t["min_s"] <= t["median_s"] <= t["max_s"]
    assert _positive(t["memory"]["peak_mb"]) and _non_negative(t["memory"]["increase_mb"])
    assert set(t["split_ms"]) == {"forward", "backward", "optimizer_step"}
    assert all(_positive(v) for v in t["split_ms"].values())
    assert sum(t["split_ms"].values()) <= 1000 * t["max_s"] * 1.01 + 0.05


def test_run_benchmark_random_inputs_both_impls_all_modes(one_thread):
    results = bench.run_benchmark(CONFIG, TINY_OPTS, mode="all", impl="both", batch_size=2, warmup=1, repeats=1,
                                  image_size=(64, 96), threads=1)
    check_results(results)
    assert results["settings"]["inference_inputs"] == "3x64x96 uint8"
    report = bench.format_report(results)
    for text in ("Inference on", "speed-up at batch 1", "Breakdown of one call", "original b1", "Training on",
                 "random init", "speed-up of a training iteration"):
        assert text in report


def test_cli_on_shapes_images_writes_json(tmp_path, shapes_root):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, BENCHMARK, "--config-file", CONFIG, "--mode", "all", "--impl", "both", "--shapes",
           "--batch-size", "2", "--warmup", "1", "--repeats", "1", "--threads", "1", "--json", str(out),
           *[str(o) for o in TINY_OPTS]]
    env = dict(os.environ, DETECTRON2_DATASETS=shapes_root, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    check_results(results)
    assert results["settings"]["inputs"] == "shapes"
    assert results["overrides"] == [str(o) for o in TINY_OPTS]
    assert "speed-up at batch 1" in proc.stdout and f"wrote {out}" in proc.stdout


def test_instrumentation_is_removed_after_the_call(one_thread):
    """The timers patch the model and module functions only during an instrumented call."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg).eval()
    from diffusioninst.modeling import postprocess as meta_arch
    from benchmarks.original_release import inference as ref  # the module whose helpers are wrapped

    before = (meta_arch.DynamicMaskWindows.window, meta_arch.masks_to_image, ref.head_forward, ref.stage_forward)
    cases = bench.inference_cases(model, cfg, bench.random_images(1, (64, 96)), ["ours", "original"], [1])
    for case in cases:
        parts = bench.instrumented_call(case["fn"], case["instrument"], model.device)
        assert parts["decoder"] > 0 and parts["total"] > 0
        if case["impl"] == "ours":
            assert parts["mask_head"] > 0 and parts["paste_masks"] > 0
    after = (meta_arch.DynamicMaskWindows.window, meta_arch.masks_to_image, ref.head_forward, ref.stage_forward)
    assert after == before
    assert "mask_features" not in vars(model.head) and "preprocess_image" not in vars(model)
    assert "extract_features" not in vars(model)
    assert not model.backbone._forward_hooks and not model.backbone._forward_pre_hooks and not model.head._forward_hooks


def test_train_mode_times_both_impls_interleaved_on_the_same_batch(one_thread, monkeypatch):
    """--mode train --impl both: ours and the original alternate, each on the same inputs; table and speed-up."""
    from benchmarks import original_release as ref
    order, batches = [], []
    original_forward = ref.original_training_forward
    ours_forward = DiffusionInst.forward

    def spy_original(model, inputs):
        order.append("original")
        batches.append([id(x["image"]) for x in inputs])
        return original_forward(model, inputs)

    def spy_ours(self, inputs):
        if self.training:
            order.append("ours")
            batches.append([id(x["image"]) for x in inputs])
        return ours_forward(self, inputs)

    monkeypatch.setattr(ref, "original_training_forward", spy_original)
    monkeypatch.setattr(DiffusionInst, "forward", spy_ours)
    results = bench.run_benchmark(CONFIG, TINY_OPTS, mode="train", impl="both", batch_size=2, warmup=1, repeats=2,
                                  image_size=(64, 96), threads=1)
    json.dumps(results, allow_nan=False)
    assert "inference" not in results and "speedup_batch1" not in results
    assert order == ["ours", "original"] * 4  # warm-up, 2 timed rounds, the memory iterations
    assert len({tuple(b) for b in batches}) == 1 and len(batches[0]) == 2
    check_train_entry(results["train"], "ours", 2, calls=2)
    check_train_entry(results["train_original"], "original", 2, calls=2)
    assert math.isclose(results["speedup_train"], results["train_original"]["median_s"] / results["train"]["median_s"])
    report = bench.format_report(results)
    rows = [line.split()[0] for line in report.splitlines() if line.split()[:1] in (["ours"], ["original"])]
    assert rows == ["ours", "original"] and "speed-up of a training iteration" in report


def test_train_mode_original_only(one_thread):
    results = bench.run_benchmark(CONFIG, TINY_OPTS, mode="train", impl="original", batch_size=2, warmup=0,
                                  repeats=1, image_size=(64, 96), threads=1)
    assert "train" not in results and "speedup_train" not in results
    check_train_entry(results["train_original"], "original", 2, calls=1)
    assert "Training on" in bench.format_report(results)


@pytest.mark.parametrize("variant", [("MODEL.DiffusionInst.FILTER_DENOISING", True),
                                     ("MODEL.DiffusionInst.FILTER_DENOISING", True, "MODEL.DiffusionInst.USE_BOX_LOSS", False)])
def test_benchmark_of_the_filter_denoising_variants(one_thread, variant):
    """A benchmark line (inference and training) for each filter-denoising variant; the original path has none."""
    results = bench.run_benchmark(CONFIG, TINY_OPTS + variant, mode="all", impl="ours", batch_size=2, warmup=1,
                                  repeats=1, image_size=(64, 96), threads=1)
    assert {(e["impl"], e["batch_size"]) for e in results["inference"]} == {("ours", 1), ("ours", 2)}
    for e in results["inference"]:
        assert _positive(e["images_per_s"]) and _non_negative(e["detections_per_image"])
        check_breakdown(e["breakdown_ms"])
    check_train_entry(results["train"], "ours", 2, calls=1)
    assert results["overrides"][-len(variant):] == [str(v) for v in variant]


def test_train_mode_follows_solver_amp(one_thread, monkeypatch):
    """SOLVER.AMP.ENABLED with bfloat16: the timed training forwards run under autocast, as train_net.py trains."""
    seen = []
    ours_forward = DiffusionInst.forward

    def spy(self, inputs):
        if self.training:
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return ours_forward(self, inputs)

    monkeypatch.setattr(DiffusionInst, "forward", spy)
    opts = [*TINY_OPTS, "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16"]
    results = bench.run_benchmark(CONFIG, opts, mode="train", batch_size=2, warmup=0, repeats=1, image_size=(64, 96),
                                  threads=1)
    check_train_entry(results["train"], "ours", 2, calls=1)
    assert seen and all(s == (True, torch.bfloat16) for s in seen)


def test_onnx_line_times_onnxruntime_against_pytorch(one_thread, capsys):
    """--impl onnx: the PyTorch path and its ONNX export by onnxruntime, same image and initial boxes, with the ratio."""
    pytest.importorskip("onnxruntime")
    results = bench.run_benchmark(CONFIG, TINY_OPTS, mode="inference", impl="onnx", batch_size=1, warmup=1, repeats=2,
                                  image_size=(64, 96))
    by_impl = {e["impl"]: e for e in results["inference"]}
    assert set(by_impl) == {"ours", "onnx"} and _positive(results["onnx_speedup_batch1"])
    assert by_impl["onnx"]["detections_per_image"] == by_impl["ours"]["detections_per_image"]
    assert set(by_impl["onnx"]["breakdown_ms"]) == {"total"}
    assert "onnxruntime against PyTorch eager at batch 1" in bench.format_report(results)
