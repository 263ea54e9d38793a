"""The benchmark's printed report: speeds, the speed-up of this code over the original path, and the breakdowns."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .measure import PART_LABELS, SUB_PARTS, TOP_PARTS




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
        if "onnx_speedup_batch1" in results:
            lines.append(f"onnxruntime against PyTorch eager at batch 1 (ours / onnx, same run, same weights and initial "
                         f"boxes): {results['onnx_speedup_batch1']:.2f}x")
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


