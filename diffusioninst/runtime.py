"""Process-level tuning of CPU runs, applied explicitly by the tools: nothing here runs at import time.

* ``CPU_KEEP_FREED_MEMORY``: glibc keeps freed memory for reuse instead of handing it back to the kernel. Each
  inference or training call frees and reallocates the same large activations (a ResNet-50 at 800x1216 moves about
  1.6 GB through them per image); with glibc's defaults every block above its mmap threshold (at most 32 MB) is a
  fresh mapping whose 4 KiB pages each cost a page fault and a zeroing on first touch (a quarter of an inference call
  on a 2-core VM).
* The OpenMP thread count of one thread (the parallel RoIAlign's workers, ``diffusioninst.layers``).
* ``malloc_trim`` for the benchmark's memory baselines.
* Whether the CPU computes bfloat16 natively (``SOLVER.AMP.DTYPE bfloat16`` on CPU falls back to float32 otherwise).

Every function is a no-op returning False where the C library or OpenMP runtime is not found (not glibc, not
Linux). This is the only module of the package that uses ctypes.
"""
from __future__ import annotations

import ctypes
import functools
import re
from typing import Any, Callable, Optional

import torch

__all__ = [
    "configure_runtime", "cpu_has_native_bfloat16", "keep_freed_memory", "malloc_trim", "set_thread_openmp_threads",
]

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Serve blocks up to 2 GiB from the heap and never trim it (glibc mallopt); process-wide, inherited by forked
    data-loader workers. The process's RSS then stays at its peak. Returns False where the C library is not glibc."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, _INT_MAX)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def malloc_trim() -> bool:
    """Return the C allocator's cached free memory to the OS (glibc); False where unavailable."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def configure_runtime(cfg: Any) -> bool:
    """Apply ``CPU_KEEP_FREED_MEMORY`` when the model runs on the CPU; True if the setting is now in effect."""
    if not cfg.CPU_KEEP_FREED_MEMORY or not str(cfg.MODEL.DEVICE).startswith("cpu"):
        return False
    return keep_freed_memory()


@functools.lru_cache(maxsize=None)
def _openmp_set_num_threads() -> Optional[Callable[[int], None]]:
    """``omp_set_num_threads`` of the OpenMP runtime torch loaded (found in /proc/self/maps); None if not found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if re.search(r"/lib(gomp|iomp5|omp)[^/]*\.so", line)}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


def set_thread_openmp_threads(count: int) -> bool:
    """Set the OpenMP thread count of the calling thread (OpenMP keeps one per thread); False if no runtime found."""
    set_num_threads = _openmp_set_num_threads()
    if set_num_threads is None:
        return False
    set_num_threads(count)
    return True


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (x86 AVX-512 BF16 or AMX), as torch's CPU capability checks report.

    Elsewhere (older x86, ARM, a torch without these checks) bfloat16 autocast is emulated and slower than float32.
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if callable(check))
