"""Count what one call would cost a GPU, on any device: kernel-launching aten ops and host syncs.

A ``TorchDispatchMode`` sees every aten op a call dispatches (forward and backward). The rules, the same on every
device (on CPU there is no device to wait for, so a sync is classified by what the op is):

* **kernel op**: every dispatched op except views. A view is an op whose schema returns an alias of an input
  without writing it (``aten::view``, ``expand``, ``slice``, ``select``, ``t``, ``detach``, ...): no kernel runs.
  Ops that only ask for metadata (``aten::sym_size``, ``is_same_size``, ...) and allocations that write nothing
  (``aten::empty``, ``empty_like``, ``empty_strided``, ``new_empty``) are excluded too.
* **host sync**: an op whose result the host must wait for: ``aten::_local_scalar_dense`` (``.item()``, ``int(t)``,
  ``float(t)``, ``if t:``), ops with a data-dependent output size (``nonzero``, ``masked_select``, ``unique`` and
  ``_unique2``, ``repeat_interleave`` with a tensor of repeats, ``index``/``index_put_`` with a boolean mask,
  ``torchvision::nms``), a copy to the CPU from another device, and the host reads that do not dispatch an aten op on
  a CPU tensor: ``Tensor.tolist()``, ``Tensor.numpy()`` and ``Tensor.cpu()`` (counted as ``host::tolist`` etc.; on a
  GPU each is one device-to-host copy). ``.to(device)`` is not counted on CPU: it cannot tell the model's device
  from the host there (inputs moved to the model's device are host-to-device copies on a GPU).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounts", "OpCounter", "count_ops", "is_view", "is_host_sync"]

_SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
    "aten::unique_dim", "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "torchvision::nms",
})
# No kernel: metadata queries, and allocations that write nothing (a caching allocator's bookkeeping on a GPU).
_NO_KERNEL_OPS = frozenset({"aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::is_same_size",
                            "aten::sym_storage_offset", "aten::is_nonzero", "aten::empty", "aten::empty_strided",
                            "aten::empty_like", "aten::new_empty", "aten::new_empty_strided"})
_HOST_READS = ("tolist", "numpy", "cpu")


def is_view(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` returns an alias of an input that it does not write (a view: no kernel)."""
    returns = op._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _has_bool_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def is_host_sync(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """Whether the op ``name`` (e.g. 'aten::nonzero') called with ``args`` makes the host wait for the device."""
    if name in _SYNC_OPS:
        return True
    if name == "aten::repeat_interleave":
        repeats = args[0] if len(args) == 1 else args[1]  # .Tensor(repeats) or .self_Tensor / .self_int(self, repeats)
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        return len(args) > 1 and _has_bool_index(args[1])
    if name in ("aten::_to_copy", "aten::copy_"):
        src = args[1] if name == "aten::copy_" else args[0]
        dst_device = args[0].device if name == "aten::copy_" else kwargs.get("device")
        return (isinstance(src, torch.Tensor) and dst_device is not None and torch.device(dst_device).type == "cpu"
                and src.device.type != "cpu")
    return False


@dataclass
class OpCounts:
    """Kernel-launching ops and host syncs of one counted call, by op name."""

    kernels: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)
    phase_kernels: Counter = field(default_factory=Counter)  # kernel ops by phase (``OpCounter.phase``)
    phase_syncs: Counter = field(default_factory=Counter)

    @property
    def num_kernels(self) -> int:
        return sum(self.kernels.values())

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())

    def top(self, n: int = 10) -> List[Tuple[str, int]]:
        """The n most frequent kernel ops, (name, count)."""
        return self.kernels.most_common(n)

    def as_dict(self, top: int = 10) -> Dict[str, Any]:
        return {"kernel_ops": self.num_kernels, "host_syncs": self.num_syncs, "top_kernel_ops": self.top(top),
                "syncs_by_op": dict(self.syncs.most_common()), "kernel_ops_by_phase": dict(self.phase_kernels),
                "host_syncs_by_phase": dict(self.phase_syncs)}


class OpCounter(TorchDispatchMode):
    """Counts into ``self.counts`` every non-view aten op dispatched while active, and the host syncs among them
    (module docstring). Host reads of CPU tensors that dispatch nothing (``tolist``, ``numpy``, ``cpu``) are counted by
    wrapping those ``Tensor`` methods while the mode is entered."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = OpCounts()
        self.phase = "other"  # what the ops are counted under in ``counts.phase_*`` (see :meth:`in_phase`)
        self._patches: contextlib.ExitStack | None = None

    def in_phase(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        """``fn`` wrapped so that the ops it dispatches count under phase ``name``."""
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            outer, self.phase = self.phase, name
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = outer

        return wrapper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name not in _NO_KERNEL_OPS and not is_view(func):
            self.counts.kernels[name] += 1
            self.counts.phase_kernels[self.phase] += 1
            if is_host_sync(name, args, kwargs):
                self.counts.syncs[name] += 1
                self.counts.phase_syncs[self.phase] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._patches = contextlib.ExitStack()
        for method in _HOST_READS:
            self._patches.enter_context(_count_host_read(self, method))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()


@contextlib.contextmanager
def _count_host_read(counter: OpCounter, method: str) -> Iterator[None]:
    """Count ``Tensor.<method>()`` on a CPU tensor as a host sync (on a device tensor it dispatches a counted copy)."""
    original = getattr(torch.Tensor, method)

    def wrapper(self, *args, **kwargs):
        if self.device.type == "cpu":
            counter.counts.syncs[f"host::{method}"] += 1
            counter.counts.phase_syncs[counter.phase] += 1
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, method, wrapper)
    try:
        yield
    finally:
        setattr(torch.Tensor, method, original)


def count_ops(fn: Callable[[], Any], model: torch.nn.Module | None = None) -> Tuple[OpCounts, Any]:
    """Run ``fn()`` once under :class:`OpCounter` -> (its counts, its result). With a DiffusionInst ``model``, the
    ops of its decoder (``model.head`` calls) and of its post-processing (``detections_to_instances``) are also
    counted by phase."""
    from diffusioninst.modeling import meta_arch

    counter = OpCounter()
    with contextlib.ExitStack() as stack:
        if model is not None and hasattr(model, "head"):
            model.head.forward = counter.in_phase(type(model.head).forward.__get__(model.head), "decoder")
            stack.callback(delattr, model.head, "forward")
            original = meta_arch.detections_to_instances
            meta_arch.detections_to_instances = counter.in_phase(original, "postprocess")
            stack.callback(setattr, meta_arch, "detections_to_instances", original)
        with counter:
            result = fn()
    return counter.counts, result


def count_inference(model: torch.nn.Module, cfg: Any, inputs: List[Dict[str, Any]], impls: List[str],
                    batch_sizes: List[int], seed: int = 0) -> List[Dict[str, Any]]:
    """Counts of one inference call per implementation and batch size (the benchmark's cases, same initial boxes)."""
    from .runs import _num_detections, inference_cases

    entries = []
    for case in inference_cases(model, cfg, inputs, impls, batch_sizes, seed):
        counts, out = count_ops(case["fn"], model if case["impl"] == "ours" else None)
        bs = case["batch_size"]
        entries.append({"impl": case["impl"], "batch_size": bs, "detections_per_image": _num_detections(out),
                        "kernel_ops_per_image": counts.num_kernels / bs, "host_syncs_per_image": counts.num_syncs / bs,
                        **counts.as_dict()})
    return entries


def count_training(model: torch.nn.Module, cfg: Any, inputs: List[Dict[str, Any]],
                   impls: List[str]) -> List[Dict[str, Any]]:
    """Counts of one training iteration (forward, backward, optimizer step) per implementation on the same batch;
    each implementation's optimizer is built (and its state created by one uncounted iteration) first."""
    from diffusioninst import build_optimizer

    from . import original_release
    from .runs import train_forwards

    forwards = train_forwards(model, inputs, impls)
    entries = []
    model.train()
    try:
        for impl in impls:
            optimizer = build_optimizer(cfg, model) if impl == "ours" else original_release.original_optimizer(cfg, model)

            def iteration(impl: str = impl, optimizer: torch.optim.Optimizer = optimizer) -> float:
                total = sum(forwards[impl]().values())
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
                return total.detach()

            iteration()
            counts, _ = count_ops(iteration)
            entries.append({"impl": impl, "batch_size": len(inputs), **counts.as_dict()})
    finally:
        model.eval()
    return entries


def run_count_ops(config_file: str, opts: List[str], mode: str, impl: str, batch_size: int,
                  image_size: Tuple[int, int], seed: int = 0) -> Dict[str, Any]:
    """Build the benchmark's model and inputs and count inference calls (batch 1 and ``batch_size``) and/or one
    training iteration at ``batch_size``; a JSON-ready dict."""
    from .runs import build_benchmark_model, random_images, random_training_inputs, setup_cfg

    cfg = setup_cfg(config_file, opts)
    model = build_benchmark_model(cfg, seed)
    impls = ["ours", "original"] if impl == "both" else [impl]
    results: Dict[str, Any] = {"config_file": config_file, "overrides": list(opts),
                               "image_size": list(image_size), "batch_size": batch_size}
    if mode in ("inference", "all"):
        results["inference"] = count_inference(model, cfg, random_images(batch_size, image_size, seed), impls,
                                               sorted({1, batch_size}), seed)
    if mode in ("train", "all"):
        inputs = random_training_inputs(batch_size, image_size, cfg.MODEL.DiffusionInst.NUM_CLASSES, seed)
        results["train"] = count_training(model, cfg, inputs, impls)
    return results


def format_counts(results: Dict[str, Any], top: int = 8) -> str:
    """The counts of ``run_count_ops`` as a table, with each case's most frequent kernel ops and its syncs."""
    lines = ["| case | impl | batch | kernel ops | host syncs | per image (ops / syncs) | detections/image |",
             "|---|---|---|---|---|---|---|"]
    details = []
    for mode in ("inference", "train"):
        for e in results.get(mode, []):
            per = (f"{e['kernel_ops_per_image']:.0f} / {e['host_syncs_per_image']:.1f}" if mode == "inference"
                   else f"{e['kernel_ops'] / e['batch_size']:.0f} / {e['host_syncs'] / e['batch_size']:.1f}")
            dets = f"{e['detections_per_image']:.1f}" if mode == "inference" else ""
            label = "inference call" if mode == "inference" else "training iteration"
            lines.append(f"| {label} | {e['impl']} | {e['batch_size']} | {e['kernel_ops']} | {e['host_syncs']} | "
                         f"{per} | {dets} |")
            ops = ", ".join(f"{n.replace('aten::', '')} {c}" for n, c in e["top_kernel_ops"][:top])
            syncs = ", ".join(f"{n.replace('aten::', '')} {c}" for n, c in e["syncs_by_op"].items())
            phases = ", ".join(f"{n} {c} / {e['host_syncs_by_phase'].get(n, 0)}"
                               for n, c in sorted(e["kernel_ops_by_phase"].items()))
            details.append(f"{label}, {e['impl']}, batch {e['batch_size']}: top ops: {ops}; syncs: {syncs or 'none'}"
                           + (f"; ops / syncs by phase: {phases}" if mode == "inference" and e["impl"] == "ours" else ""))
    return "\n".join(lines + [""] + details)
