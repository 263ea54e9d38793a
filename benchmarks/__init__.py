"""The speed and memory benchmark behind tools/benchmark.py: this package's code path against the original release's
(``benchmarks.original_release``), on the same weights and inputs, in one run."""
from .measure import PART_LABELS, SUB_PARTS, TOP_PARTS, PartTimer, instrumented_call, median_parts
from .report import format_report
from .runs import (
    bench_inference, bench_train, build_benchmark_model, inference_cases, random_images, random_training_inputs,
    run_benchmark, setup_cfg, shapes_inputs,
)

__all__ = [
    "PART_LABELS", "SUB_PARTS", "TOP_PARTS", "PartTimer", "bench_inference", "bench_train", "build_benchmark_model",
    "format_report", "inference_cases", "instrumented_call", "median_parts", "random_images",
    "random_training_inputs", "run_benchmark", "setup_cfg", "shapes_inputs",
]
