"""diffusioninst.runtime: CPU_KEEP_FREED_MEMORY (glibc keeps freed memory, so a large tensor allocated again reuses
mapped pages), applied only when a tool asks, and nothing of it at import time."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from detectron2.config import get_cfg

from diffusioninst import add_diffusioninst_config, runtime

FAULTS_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from diffusioninst.runtime import keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    def faults_of_64mb_tensors(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            torch.ones(16 << 20)  # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_64mb_tensors(15)  # kept: the heap settles after a few (aligned blocks do not fit the first holes)
    print(kept, faults_of_64mb_tensors(10))
""")


def _steady_allocation_faults(mode: str):
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.slow
def test_freed_memory_is_reused_without_page_faults():
    kept, faults = _steady_allocation_faults("keep")
    if kept != "True":
        pytest.skip("not glibc: the allocator setting does not apply")
    _, default_faults = _steady_allocation_faults("default")
    assert default_faults > 100_000  # 16384 pages of 4 KiB mapped afresh for each tensor by default
    assert faults < 1_000


@pytest.mark.parametrize("device,enabled,applies", [("cpu", True, True), ("cpu", False, False),
                                                    ("cuda", True, False), ("cuda:1", True, False)])
def test_configure_runtime_follows_the_key_and_device(monkeypatch, device, enabled, applies):
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    cfg.MODEL.DEVICE, cfg.CPU_KEEP_FREED_MEMORY = device, enabled
    assert runtime.configure_runtime(cfg) is applies
    assert len(calls) == int(applies)


@pytest.mark.slow
def test_importing_the_package_tunes_nothing():
    """No allocator setting, no OpenMP call, no fork hook and no ctypes outside runtime.py happen at import time."""
    script = textwrap.dedent("""
        import os, sys
        hooks, register = [], os.register_at_fork
        def record(**kw):
            hooks.extend(m for m in (getattr(f, "__module__", None) or "" for f in kw.values()) if m.startswith("diffusioninst"))
            register(**kw)
        os.register_at_fork = record
        import diffusioninst, diffusioninst.layers, diffusioninst.modeling
        from diffusioninst import runtime
        print(hooks == [], runtime._libc.cache_info().currsize, runtime._openmp_set_num_threads.cache_info().currsize)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "0", "0"]


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_training_falls_back_to_float32_where_the_cpu_has_no_bfloat16(monkeypatch, caplog, native):
    """SOLVER.AMP bfloat16 on CPU autocasts only where the CPU computes bfloat16; elsewhere float32 and a warning."""
    import torch

    from diffusioninst import engine

    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.DTYPE = True, "bfloat16"
    monkeypatch.setattr(engine, "cpu_has_native_bfloat16", lambda: native)
    with caplog.at_level("WARNING", logger="diffusioninst.engine"):
        dtype = engine.training_amp_dtype(cfg)
    assert dtype == (torch.bfloat16 if native else None)
    assert ("training in float32 instead" in caplog.text) is not native
    cfg.SOLVER.AMP.ENABLED = False
    assert engine.training_amp_dtype(cfg) is None


def test_native_bfloat16_check_answers_without_error():
    assert runtime.cpu_has_native_bfloat16() in (True, False)
