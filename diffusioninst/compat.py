"""Make detectron2 v0.6 (the offline install without compiled ops) work on today's stack.

Imported by ``diffusioninst/__init__.py`` before anything touches detectron2. Every shim applies only when the
thing it stands in for is missing, the v0.6 release is installed (told apart from detectron2's main branch, which
reports the same version, by what main added), or a probe of the behaviour fails; on a full, modern detectron2 this
module changes nothing. No shim reads source text or bytecode.
"""
from __future__ import annotations

import importlib.util
import sys
import types

__all__ = ["HAS_COMPILED_OPS", "apply"]

HAS_COMPILED_OPS: bool = True


def _patch_pillow() -> None:
    # Pillow >= 10 removed Image.LINEAR; v0.6's transform.py uses it as a default argument at import time.
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def _patch_numpy() -> None:
    # numpy 1.24-1.26 lack np.bool; v0.6's polygons_to_bitmask uses it for empty polygons (numpy 2 has it).
    import numpy as np

    if "bool" not in np.__dict__:
        np.bool = bool


def _patch_pkg_resources() -> None:
    # setuptools >= 81 no longer ships pkg_resources; v0.6's model_zoo imports it for resource_filename.
    if importlib.util.find_spec("pkg_resources") is not None:
        return
    module = types.ModuleType("pkg_resources")

    def resource_filename(package: str, resource: str) -> str:
        import os

        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"pkg_resources shim: package {package!r} not found")
        return os.path.join(os.path.dirname(spec.origin), resource)

    module.resource_filename = resource_filename
    sys.modules["pkg_resources"] = module


class _MissingCompiledOps(types.ModuleType):
    """Stand-in for ``detectron2._C``: imports succeed, any use names what is unavailable and why.

    The three queries detectron2's collect_env makes get honest answers, so environment reports still work.
    """

    @staticmethod
    def get_compiler_version() -> str:
        return "none (detectron2 installed without compiled ops)"

    @staticmethod
    def get_cuda_version() -> str:
        return "none (detectron2 installed without compiled ops)"

    @staticmethod
    def has_cuda() -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(
            f"detectron2._C.{name} is unavailable: this detectron2 was installed without compiled ops "
            "(offline install from the pb1-detectron2 sdist). Deformable convs, rotated boxes and the "
            "C++ COCOeval need a detectron2 built from source; DiffusionInst does not use them."
        )


def _patch_compiled_ops() -> None:
    # Without detectron2._C, v0.6's detectron2.layers and detectron2.evaluation fail at import time.
    global HAS_COMPILED_OPS
    if "detectron2._C" in sys.modules:
        HAS_COMPILED_OPS = not isinstance(sys.modules["detectron2._C"], _MissingCompiledOps)
        return
    try:
        import detectron2._C  # noqa: F401
    except ImportError:
        HAS_COMPILED_OPS = False
        sys.modules["detectron2._C"] = _MissingCompiledOps("detectron2._C")
        return


def _patch_coco_eval() -> None:
    # With no compiled COCOeval, COCOEvaluator's fast path uses faster-coco-eval (same numbers, C++ speed).
    if HAS_COMPILED_OPS:
        return
    from detectron2.evaluation import coco_evaluation

    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        from pycocotools.cocoeval import COCOeval as COCOeval_faster
    coco_evaluation.COCOeval_opt = COCOeval_faster


def _cpu_distributed_worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args,
                            timeout=None):
    """v0.6's worker, with GLOO and no device pinning when there is no GPU (as detectron2 main does)."""
    import datetime

    import torch.distributed as dist
    from detectron2.utils import comm

    global_rank = machine_rank * num_gpus_per_machine + local_rank
    dist.init_process_group(backend="GLOO", init_method=dist_url, world_size=world_size, rank=global_rank,
                            timeout=timeout or datetime.timedelta(minutes=30))
    for i in range(world_size // num_gpus_per_machine):
        group = dist.new_group(list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)


def _is_v06_release() -> bool:
    """detectron2's v0.6 release (also the PyPI sdist) rather than its main branch, which reports the same
    ``__version__``: main added ``comm.create_local_process_group`` (with GLOO launches without GPUs)."""
    import detectron2
    from detectron2.utils import comm

    return detectron2.__version__ == "0.6" and not hasattr(comm, "create_local_process_group")


def _patch_cpu_launch() -> None:
    # v0.6's launch asserts CUDA and uses NCCL; on a machine without GPUs, run the workers over GLOO instead.
    import importlib

    import torch

    launch_module = importlib.import_module("detectron2.engine.launch")  # the package re-exports a function named launch
    if _is_v06_release() and not torch.cuda.is_available():
        launch_module._distributed_worker = _cpu_distributed_worker


def _map_dataset_getitem(self, idx):
    """v0.6's MapDataset.__getitem__ (retry another element when the mapper returns None), drawing the retry from a
    sorted list: Python 3.11's random.sample no longer accepts the set v0.6 gives it."""
    import logging

    from detectron2.data import common

    retry_count = 0
    cur_idx = int(idx)
    while True:
        data = self._map_func(self._dataset[cur_idx])
        if data is not None:
            self._fallback_candidates.add(cur_idx)
            return data
        retry_count += 1
        self._fallback_candidates.discard(cur_idx)
        if not self._fallback_candidates:
            raise RuntimeError("the dataset mapper returned None (skipped) for every element of the dataset")
        cur_idx = self._rng.choice(sorted(self._fallback_candidates))
        if retry_count >= 3:
            logging.getLogger(common.__name__).warning(
                "Failed to apply `_map_func` for idx: %s, retry count: %s", idx, retry_count)


def _patch_map_dataset_retry() -> None:
    # A mapper that skips an element (DATASETS.SKIP_INVALID) makes v0.6's MapDataset retry with random.sample on a
    # set, a TypeError on Python >= 3.11: probe the behaviour on two elements, replace __getitem__ if it fails.
    from detectron2.data.common import MapDataset

    probe = MapDataset([0, 1], lambda x: None if x == 0 else x)
    try:
        probe[0]
    except TypeError:
        MapDataset.__getitem__ = _map_dataset_getitem


def _patch_cpu_ddp() -> None:
    # create_ddp_model passes device_ids=[local_rank], which DistributedDataParallel rejects for a CPU model.
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if getattr(original, "_cpu_aware", False):
        return

    def create_ddp_model(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    create_ddp_model._cpu_aware = True
    defaults.create_ddp_model = create_ddp_model


_APPLIED = False


def apply() -> None:
    """Install the shims once; safe to call repeatedly."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    _patch_pillow()
    _patch_numpy()
    _patch_pkg_resources()
    _patch_compiled_ops()
    _patch_coco_eval()
    _patch_cpu_launch()
    _patch_cpu_ddp()
    _patch_map_dataset_retry()
