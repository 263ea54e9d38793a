"""The training engine under tools/train_net.py: :class:`DiffusionInstTrainer` (detectron2's DefaultTrainer with
atomic checkpoints, model EMA, mixed precision in float16 or bfloat16, a stop on a non-finite loss with the terms
named, explained CUDA out-of-memory errors and every finished evaluation kept on disk) and its pieces."""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import time
import warnings
import weakref
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from detectron2.engine import DefaultTrainer, hooks
from detectron2.utils import comm
from torch import nn

from .checkpoint import (
    CheckpointMismatchError, DiffusionInstCheckpointer, architecture, check_architecture,
)
from .errors import UserError
from .runtime import cpu_has_native_bfloat16

__all__ = [
    "DiffusionInstTrainer",
    "check_optimizer_state",
    "check_resume",
    "EvalHook",
    "amp_grad_scaler",
    "mixed_precision_step",
    "training_amp_dtype",
    "LossCheck",
    "NonFiniteLossError",
    "nonfinite_terms",
    "out_of_memory_error",
    "save_eval_results",
]


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss term became NaN or Inf; raised before the backward pass, so the weights are still the last good ones."""

    def __init__(self, iteration: Optional[int], bad: Mapping[str, float], finite: Mapping[str, float],
                 last_checkpoint: str = ""):
        self.iteration, self.terms = iteration, dict(bad)
        at = f"at iteration {iteration}" if iteration is not None else ""
        bad_text = ", ".join(f"{k}={v}" for k, v in bad.items())
        ok_text = ", ".join(f"{k}={v:.4g}" for k, v in finite.items())
        kept = (f"The last checkpoint, {last_checkpoint}, was written before this and is intact"
                if last_checkpoint else "No checkpoint had been written yet")
        super().__init__(
            f"Non-finite loss {at}: {bad_text} (finite terms: {ok_text or 'none'}). Training stopped before the "
            f"backward pass; no checkpoint of this state was written. {kept}. To continue, lower SOLVER.BASE_LR, "
            "raise SOLVER.WARMUP_ITERS, or enable SOLVER.CLIP_GRADIENTS.ENABLED, check the training annotations "
            "for empty or degenerate boxes and masks, then rerun with --resume."
        )


def nonfinite_terms(loss_dict: Mapping[str, Any]) -> Dict[str, float]:
    """The entries of a loss dict that are not finite, as floats."""
    bad = {}
    for name, value in loss_dict.items():
        if torch.is_tensor(value) and not bool(torch.isfinite(value.detach()).all()):
            bad[name] = float(value.detach().float().sum())
        elif isinstance(value, float) and not math.isfinite(value):
            bad[name] = value
    return bad


class LossCheck:
    """A forward hook on the training model: when it returns a loss dict with a NaN/Inf term, raise
    :class:`NonFiniteLossError` (naming the iteration, the bad terms and the last checkpoint) before backward."""

    def __init__(self, model: nn.Module, iteration: Callable[[], int], last_checkpoint: Callable[[], str]):
        self._iteration, self._last_checkpoint = iteration, last_checkpoint
        self.handle = model.register_forward_hook(self._check)

    def _check(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not module.training or not isinstance(output, Mapping):
            return
        bad = nonfinite_terms(output)
        if bad:
            finite = {k: float(v.detach().float()) for k, v in output.items() if k not in bad and torch.is_tensor(v)
                      and v.numel() == 1}
            raise NonFiniteLossError(self._iteration(), bad, finite, self._last_checkpoint())

    def remove(self) -> None:
        self.handle.remove()


def out_of_memory_error(cfg, phase: str, exc: BaseException, iteration: Optional[int] = None,
                        last_checkpoint: str = "") -> BaseException:
    """A torch.cuda.OutOfMemoryError whose message says which config keys reduce memory, with their values.

    ``phase`` is "training" or "evaluation".
    """
    d = cfg.MODEL.DiffusionInst
    world = max(comm.get_world_size(), 1)
    if phase == "training":
        where = f"during training (iteration {iteration})" if iteration is not None else "during training"
        advice = [
            f"SOLVER.IMS_PER_BATCH (now {cfg.SOLVER.IMS_PER_BATCH}, {cfg.SOLVER.IMS_PER_BATCH // world} per GPU): "
            "lower it, and scale SOLVER.BASE_LR by the same factor",
            f"INPUT.MAX_SIZE_TRAIN (now {cfg.INPUT.MAX_SIZE_TRAIN}) / INPUT.MIN_SIZE_TRAIN "
            f"(now {tuple(cfg.INPUT.MIN_SIZE_TRAIN)}): train on smaller images",
            f"MODEL.DiffusionInst.NUM_PROPOSALS (now {d.NUM_PROPOSALS}): fewer boxes per image",
            f"SOLVER.AMP.ENABLED (now {cfg.SOLVER.AMP.ENABLED}): True trains in mixed precision with less memory",
        ]
        tail = (f" The last checkpoint, {last_checkpoint}, is intact; rerun with --resume after changing the config."
                if last_checkpoint else "")
    else:
        where = "during evaluation"
        advice = [
            f"INPUT.MAX_SIZE_TEST (now {cfg.INPUT.MAX_SIZE_TEST}) / INPUT.MIN_SIZE_TEST "
            f"(now {cfg.INPUT.MIN_SIZE_TEST}): evaluate on smaller images",
            f"MODEL.DiffusionInst.NUM_PROPOSALS (now {d.NUM_PROPOSALS}): fewer boxes per image",
            f"TEST.AUG.ENABLED (now {cfg.TEST.AUG.ENABLED}): test-time augmentation runs many scales; disable it",
            f"SOLVER.IMS_PER_BATCH (now {cfg.SOLVER.IMS_PER_BATCH}): if this happened during training's "
            "evaluation, the training batch may hold memory; evaluate separately with --eval-only",
        ]
        tail = ""
    message = (f"CUDA ran out of memory {where}. To use less memory, change: \n  - " + "\n  - ".join(advice)
               + f"\n{tail}\n(PyTorch: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})")
    return torch.cuda.OutOfMemoryError(message)


def _json_safe(value: Any) -> Any:
    """Nested results with NaN/Inf as null and tensors/numpy scalars as numbers (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return str(value)


def save_eval_results(results_by_dataset: Mapping[str, Any], root: str, **info: Any) -> list:
    """Write each dataset's metrics to ``root/<dataset>/results.json`` (atomically) and append them as a line to
    ``root/<dataset>/results_history.jsonl``; ``info`` (iteration, weights...) is stored alongside.

    Returns the paths of the results.json files.
    """
    from .checkpoint import atomic_write

    paths = []
    for dataset, results in results_by_dataset.items():
        folder = os.path.join(root, dataset)
        os.makedirs(folder, exist_ok=True)
        record = _json_safe({"dataset": dataset, **info,
                             "time": datetime.datetime.now().isoformat(timespec="seconds"), "results": results})
        path = os.path.join(folder, "results.json")
        atomic_write(path, lambda f: json.dump(record, f, indent=2), binary=False, fsync=False)
        with open(os.path.join(folder, "results_history.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths


class EvalHook(hooks.EvalHook):
    """detectron2's EvalHook, except that the final evaluation runs only when training finished its schedule
    (detectron2 also evaluates a run that failed in its last iteration)."""

    def after_train(self):
        if self.trainer.iter >= self.trainer.max_iter:  # TrainerBase.train leaves iter == max_iter only on success
            self._do_eval()
        del self._func


def mixed_precision_step(trainer: Any, dtype: torch.dtype, device_type: str) -> None:
    """One iteration of detectron2's AMPTrainer (its data iterator, model, optimizer, grad scaler and metrics) under
    ``torch.autocast(device_type, dtype)``: float16 scales the loss with the trainer's grad scaler, bfloat16 (float32's
    exponent range) needs no scaling and also runs on CPU, where v0.6's AMPTrainer is CUDA and float16 only."""
    start = time.perf_counter()
    data = next(trainer._data_loader_iter)
    data_time = time.perf_counter() - start
    with torch.autocast(device_type, dtype=dtype):
        loss_dict = trainer.model(data)
        losses = sum(loss_dict.values())
    trainer.optimizer.zero_grad()
    trainer.grad_scaler.scale(losses).backward()
    trainer._write_metrics(loss_dict, data_time)
    trainer.grad_scaler.step(trainer.optimizer)
    trainer.grad_scaler.update()


def training_amp_dtype(cfg: Any) -> Optional[torch.dtype]:
    """The autocast dtype of training (SOLVER.AMP.DTYPE), or None (float32) without SOLVER.AMP.ENABLED, and for
    bfloat16 on a CPU that has no bfloat16 arithmetic (emulated, it is slower than float32; a warning says so)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    dtype = getattr(torch, cfg.SOLVER.AMP.DTYPE)
    if dtype == torch.bfloat16 and torch.device(cfg.MODEL.DEVICE).type == "cpu" and not cpu_has_native_bfloat16():
        logging.getLogger(__name__).warning(
            "SOLVER.AMP.DTYPE bfloat16: this CPU has no bfloat16 arithmetic (AVX-512 BF16 or AMX), where it is "
            "slower than float32; training in float32 instead")
        return None
    return dtype


def amp_grad_scaler(dtype: torch.dtype, device_type: str) -> torch.amp.GradScaler:
    """The loss scaler of mixed-precision training: active for float16 on CUDA, a pass-through otherwise."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16 and device_type == "cuda")


class DiffusionInstTrainer(DefaultTrainer):
    """DefaultTrainer with atomic checkpoints (that record the model's architecture and refuse a resume into another),
    model EMA (``MODEL_EMA``), mixed precision in float16 or bfloat16 (``SOLVER.AMP``), a non-finite-loss check,
    explained out-of-memory errors, and every evaluation saved to ``OUTPUT_DIR/<results_dir>/<dataset>/results.json``.
    tools/train_net.py adds DiffusionInst's data, optimizer and evaluators."""

    def __init__(self, cfg):
        with warnings.catch_warnings():  # v0.6's AMPTrainer makes a CUDA GradScaler (warning on CPU), replaced below
            warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler")
            super().__init__(cfg)
        self.amp_dtype = training_amp_dtype(cfg)
        if self.amp_dtype is not None:
            self._trainer.grad_scaler = amp_grad_scaler(self.amp_dtype, torch.device(cfg.MODEL.DEVICE).type)
        me = weakref.proxy(self)  # no reference cycle through the model's forward hook
        self.loss_check = LossCheck(self._trainer.model, lambda: me.iter, lambda: me.last_checkpoint())

    def last_checkpoint(self) -> str:
        return self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else ""

    def train(self):
        """A run killed between its last periodic checkpoint and model_final resumes with no iteration left:
        model_final is then written from the restored state, before the final evaluation."""
        if self.start_iter >= self.max_iter and not os.path.isfile(os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")):
            self.checkpointer.save("model_final", iteration=self.max_iter - 1)
        return super().train()

    def run_step(self):
        self._trainer.iter = self.iter
        try:
            if self.amp_dtype is None:
                self._trainer.run_step()
            else:  # detectron2's AMPTrainer step, with SOLVER.AMP.DTYPE
                mixed_precision_step(self._trainer, self.amp_dtype, torch.device(self.cfg.MODEL.DEVICE).type)
        except torch.cuda.OutOfMemoryError as exc:
            raise out_of_memory_error(self.cfg, "training", exc, self.iter, self.last_checkpoint()) from exc

    def state_dict(self):
        """Also the optimizer and AMP scaler state, which v0.6's DefaultTrainer leaves out of checkpoints."""
        return {"_trainer": self._trainer.state_dict(), **super().state_dict()}

    def load_state_dict(self, state_dict):
        if "_trainer" in state_dict:  # optimizer state that does not fit the parameters is refused, not loaded
            check_optimizer_state(self.optimizer, state_dict["_trainer"].get("optimizer"))
            self._trainer.load_state_dict(state_dict["_trainer"])
        super().load_state_dict(state_dict)

    def build_hooks(self):
        """Default hooks with the atomic checkpointer (DefaultTrainer.__init__ builds its own just before this);
        with MODEL_EMA.ENABLED the EMA is updated before checkpoints and used to evaluate."""
        from .ema import EMAHook, ModelEMA

        self.checkpointer = DiffusionInstCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, allow_pickle=self.cfg.MODEL.WEIGHTS_ALLOW_PICKLE,
            architecture=architecture(self.cfg), trainer=weakref.proxy(self))
        ret, self.model_ema = super().build_hooks(), None
        if self.cfg.MODEL_EMA.ENABLED:
            self.model_ema = ModelEMA(self.model, self.cfg.MODEL_EMA.DECAY, self.cfg.MODEL_EMA.DEVICE)
            self.checkpointer.add_checkpointable("model_ema", self.model_ema)
            ret.insert(2, EMAHook(self.model_ema, self.model))  # right after the LR scheduler, before checkpoints
        return [EvalHook(self.cfg.TEST.EVAL_PERIOD, self.evaluate) if isinstance(h, hooks.EvalHook) else h
                for h in ret]

    def evaluate(self):
        """Evaluation during and after training (with the EMA weights if enabled), saved with the iteration."""
        with self.model_ema.apply_to(self.model) if self.model_ema is not None else contextlib.nullcontext():
            self._last_eval_results = self.test(self.cfg, self.model, iteration=min(self.iter, self.max_iter - 1),
                                                ema=self.model_ema is not None)
        return self._last_eval_results

    @classmethod
    def test(cls, cfg, model, evaluators=None, *, results_dir: str = "inference", **info):
        """DefaultTrainer.test, with the metrics (and ``info``: iteration, weights) saved to
        OUTPUT_DIR/<results_dir>/<dataset>/results.json and out-of-memory errors explained."""
        try:
            results = super().test(cfg, model, evaluators)
        except torch.cuda.OutOfMemoryError as exc:
            raise out_of_memory_error(cfg, "evaluation", exc) from exc
        if comm.is_main_process() and cfg.DATASETS.TEST:
            per_dataset = {cfg.DATASETS.TEST[0]: results} if len(cfg.DATASETS.TEST) == 1 else results
            for path in save_eval_results(per_dataset, os.path.join(cfg.OUTPUT_DIR, results_dir), **info):
                logging.getLogger("diffusioninst").info("Evaluation results saved to %s", path)
        return results


def check_resume(cfg) -> None:
    """Before a ``--resume`` run writes anything: refuse when the last checkpoint in ``cfg.OUTPUT_DIR`` was trained
    with other architecture keys (classes, proposals, backbone...), or its classifier has another class count."""
    checkpointer = DiffusionInstCheckpointer(torch.nn.Module(), cfg.OUTPUT_DIR)
    if not checkpointer.has_checkpoint():
        return
    path = checkpointer.get_checkpoint_file()
    if not os.path.isfile(path):
        return  # reported with its own message when the trainer resumes
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (unreadable: the trainer's load reports it)
        return
    ours = architecture(cfg)
    check_architecture(ours, checkpoint.get("architecture"), path)
    logits = checkpoint.get("model", {}).get("head.head_series.0.class_logits.weight")
    num_classes = ours.get("MODEL.DiffusionInst.NUM_CLASSES")
    if logits is not None and num_classes is not None and logits.shape[0] != num_classes:
        check_architecture({"MODEL.DiffusionInst.NUM_CLASSES": num_classes},
                            {"MODEL.DiffusionInst.NUM_CLASSES": int(logits.shape[0])}, path)


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Optional[Dict[str, Any]]) -> None:
    """Refuse optimizer ``state`` whose tensors do not fit the optimizer's parameters (loading it would make the
    fused step fail, or worse); called before a resumed trainer loads it."""
    if not state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in state.get("param_groups", []) for i in group["params"]]
    if len(saved) != len(params):
        raise CheckpointMismatchError(
            f"cannot --resume: the checkpoint's optimizer holds {len(saved)} parameters, the model of the config "
            f"{len(params)}; nothing was loaded into the optimizer. Train into another OUTPUT_DIR")
    for index, param in zip(saved, params):
        for name, value in state.get("state", {}).get(index, {}).items():
            if torch.is_tensor(value) and value.dim() and tuple(value.shape) != tuple(param.shape):
                raise CheckpointMismatchError(
                    f"cannot --resume: optimizer state {name} of parameter {index} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(param.shape)}; nothing was loaded into the optimizer. Train into another "
                    "OUTPUT_DIR")
