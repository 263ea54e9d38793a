"""A DetectionCheckpointer that explains load problems and never leaves a half-written checkpoint.

* Missing file: :class:`CheckpointNotFoundError` (a FileNotFoundError) naming the file and where it came from
  (``MODEL.WEIGHTS`` or ``OUTPUT_DIR/last_checkpoint``), instead of fvcore's bare ``assert``.
* Truncated or corrupt file: :class:`CorruptCheckpointError` naming the file and saying it is incomplete.
* Wrong architecture or class count: a WARNING summary of what was skipped and left as initialised (shape
  mismatches with both shapes, NUM_CLASSES named where the classifier differs, missing and unused tensors),
  also kept as ``checkpointer.last_load_report``.
* Saving: written to a temporary file in the same folder, flushed to disk, then renamed over the final name
  (``os.replace`` is atomic), and ``last_checkpoint`` is replaced the same way, so a process killed during a
  save leaves the previous checkpoint and tag intact. A model with NaN/Inf weights is not saved.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .errors import UserError
from .safe_load import UnsafeCheckpointError, load_pickled_weights, refused_object

__all__ = [
    "ARCHITECTURE_KEYS",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DiffusionInstCheckpointer",
    "LoadReport",
    "NonFiniteWeightsError",
    "architecture",
    "check_architecture",
    "load_weights",
]

logger = logging.getLogger(__name__)

_TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """The checkpoint file to load does not exist."""


class CorruptCheckpointError(UserError, RuntimeError):
    """The checkpoint file exists but cannot be read (truncated, partly written, or not a checkpoint)."""


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint does not fit the model of the config (resuming, or evaluating with incomplete weights)."""


class NonFiniteWeightsError(UserError, FloatingPointError):
    """The model holds NaN/Inf weights; saving them would overwrite a usable checkpoint with a broken one."""


@dataclass
class LoadReport:
    """What a load left out: shape mismatches (key, checkpoint shape, model shape), missing and unused keys."""

    path: str
    loaded: int
    total: int
    shape_mismatches: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.shape_mismatches or self.missing or self.unexpected)

    def summary(self) -> str:
        """Several lines for the log; empty when everything matched."""
        if self.clean:
            return ""
        lines = [f"Checkpoint {self.path} does not fully match the model: loaded {self.loaded} of {self.total} "
                 f"model tensors; the others keep the model's own (random) initialisation."]
        if self.shape_mismatches:
            lines.append(f"  {len(self.shape_mismatches)} keys skipped because of shape mismatch "
                         "(name: checkpoint shape -> model shape):")
            lines += [f"    {k}: {tuple(c)} -> {tuple(m)}" for k, c, m in self.shape_mismatches[:20]]
            if len(self.shape_mismatches) > 20:
                lines.append(f"    ... and {len(self.shape_mismatches) - 20} more")
            classes = {(c[0], m[0]) for k, c, m in self.shape_mismatches
                       if _is_classifier(k) and c and m and c[0] != m[0]}
            if classes:
                ckpt, model = sorted(classes)[0]
                lines.append(f"  class_logits: MODEL.DiffusionInst.NUM_CLASSES differs: checkpoint {ckpt}, model "
                             f"{model}. Expected when fine-tuning on another dataset (the classifier is retrained); "
                             "otherwise set NUM_CLASSES to match the checkpoint.")
        if self.missing:
            lines.append(f"  {len(self.missing)} model keys not in the checkpoint (randomly initialised): "
                         f"{_grouped(self.missing)}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} checkpoint keys the model does not have (ignored): "
                         f"{_grouped(self.unexpected)}")
        others = [k for k, *_ in self.shape_mismatches if not _is_classifier(k)]
        if others or (self.total and self.loaded < 0.5 * self.total):
            why = (f"{len(others)} tensors besides the classifier differ in shape" if others
                   else "less than half of the model was loaded")
            lines.append(f"  {why}: the checkpoint is probably for another architecture or config (backbone depth, "
                         "FPN.OUT_CHANNELS, HIDDEN_DIM, NUM_HEADS...). Check MODEL.WEIGHTS and the config file.")
        return "\n".join(lines)


def _is_classifier(key: str) -> bool:
    return key.endswith(("class_logits.weight", "class_logits.bias"))


def _grouped(keys: List[str], groups: int = 6) -> str:
    """Keys counted by their first two name parts: ``head.head_series (120), backbone.fpn_lateral2 (2)...``."""
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    text = ", ".join(f"{prefix} ({n})" for prefix, n in counts.most_common(groups))
    return text + (f", ... ({len(counts) - groups} more groups)" if len(counts) > groups else "")


def _short_reason(exc: BaseException) -> str:
    """The informative part of torch.load's error (its weights_only advice does not apply to a broken file)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ", 1)[0]
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: str, write, binary: bool = True, fsync: bool = True) -> None:
    """Write ``path`` via ``write(file)`` into ``.<name>.<pid>.tmp`` in the same folder, then ``os.replace``."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    if fsync:  # make the rename itself durable
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


class DiffusionInstCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with clear load errors and reports, and atomic saves (see the module docstring).

    ``source`` names where the path to load comes from, for messages (default ``MODEL.WEIGHTS``).
    """

    fsync = True  # flush checkpoints to disk before renaming (survives a machine crash, not only a killed process)

    def __init__(self, model, save_dir: str = "", *, save_to_disk=None, allow_pickle: bool = False,
                 architecture: Optional[Dict[str, Any]] = None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.last_load_report: Optional[LoadReport] = None
        self.allow_pickle = allow_pickle  # MODEL.WEIGHTS_ALLOW_PICKLE: unpickle files without restriction
        self.architecture = architecture  # written into every checkpoint, compared on --resume
        self._source = "MODEL.WEIGHTS"
        self._path = ""
        self._resuming = False

    # ---------------------------------------------------------------------------------------------- loading
    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume and self.has_checkpoint():
            tag = os.path.join(self.save_dir, "last_checkpoint")
            self._resuming = True  # a model that does not fit is refused before anything is loaded
            try:
                return self.load(self.get_checkpoint_file(), source=f"the last checkpoint named by {tag} (--resume)")
            finally:
                self._resuming = False
        return self.load(path, checkpointables=[])

    def load(self, path: str, checkpointables: Optional[List[str]] = None, *, source: str = "MODEL.WEIGHTS"):
        self._source, self._path = source, path
        if path:
            local = path
            if not os.path.isfile(path):
                try:
                    local = self.path_manager.get_local_path(path)
                except Exception as exc:  # e.g. a URL that cannot be downloaded
                    raise CheckpointNotFoundError(
                        f"{source}: cannot fetch checkpoint {path!r}: {exc}") from exc
            if os.path.isdir(local):
                raise CheckpointNotFoundError(f"{source}: {path} is a directory, not a checkpoint file; name the "
                                              ".pth/.pkl file in it")
            if not os.path.isfile(local):
                raise CheckpointNotFoundError(self._not_found_message(path, source))
            path = local
        return super().load(path, checkpointables)

    def _not_found_message(self, path: str, source: str) -> str:
        message = f"{source}: checkpoint file {path!r} does not exist"
        folder = os.path.dirname(path) or "."
        if os.path.isdir(folder):
            others = sorted(f for f in os.listdir(folder) if f.endswith((".pth", ".pkl", ".pyth")))
            if others:
                message += f" (checkpoints in {folder}: {', '.join(others[-5:])})"
        if source == "MODEL.WEIGHTS":
            message += "; set MODEL.WEIGHTS to an existing .pth/.pkl file, or to \"\" to start from scratch"
        else:
            message += "; point last_checkpoint at an existing checkpoint, or train without --resume"
        return message

    def _load_file(self, filename: str) -> Dict[str, Any]:
        """detectron2's reading of .pkl / .pyth / .pth files, without running code from them: .pkl files are first
        parsed by :func:`load_pickled_weights`, .pth files are read weights-only (unless ``allow_pickle``)."""
        if os.path.isfile(filename) and os.path.getsize(filename) == 0:
            raise CorruptCheckpointError(self._corrupt_message(filename, "the file is empty"))
        try:
            if filename.endswith(".pkl"):
                load_pickled_weights(filename, self.allow_pickle)  # refuses a file that would run code
                loaded = super()._load_file(filename)
            elif filename.endswith(".pyth"):
                loaded = super()._load_file(filename)
            else:
                loaded = torch.load(filename, map_location="cpu", weights_only=not self.allow_pickle)
                loaded = loaded if isinstance(loaded, dict) and "model" in loaded else {"model": loaded}
        except UserError:
            raise
        except pickle.UnpicklingError as exc:
            refused = refused_object(exc)
            if refused:
                raise UnsafeCheckpointError(
                    f"{self._source}: {filename} holds the object {refused}, not only weights; it was not "
                    "loaded, since unpickling it could run code. If you trust the file, set "
                    "MODEL.WEIGHTS_ALLOW_PICKLE True") from None
            raise CorruptCheckpointError(self._corrupt_message(filename, _short_reason(exc))) from exc
        except Exception as exc:  # noqa: BLE001  (any content that is not a checkpoint: a text file, an image...)
            raise CorruptCheckpointError(self._corrupt_message(filename, _short_reason(exc))) from exc
        if not isinstance(loaded, dict) or not isinstance(loaded.get("model"), dict):
            kind = type(loaded.get("model") if isinstance(loaded, dict) else loaded).__name__
            raise CorruptCheckpointError(self._corrupt_message(filename, f"it holds a {kind}, not a state dict"))
        return loaded

    def _corrupt_message(self, filename: str, why: str) -> str:
        message = (f"{self._source}: cannot read checkpoint {filename}: it is incomplete or corrupt ({why}). "
                   "It may have been cut short by a crash or an interrupted copy/download; ")
        folder = os.path.dirname(filename) or "."
        others = sorted(f for f in os.listdir(folder) if f.endswith(".pth") and f != os.path.basename(filename)) \
            if os.path.isdir(folder) else []
        if self._source != "MODEL.WEIGHTS":
            message += ("delete it and point last_checkpoint at an earlier checkpoint"
                        + (f" ({', '.join(others[-3:])})" if others else "") + ", then --resume again.")
        else:
            message += "copy or download it again."
        return message

    def _load_model(self, checkpoint: Any):
        if self._resuming:
            check_architecture(self.architecture, checkpoint.get("architecture"), self._path)
            ours = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
            theirs = {k: tuple(v.shape) for k, v in checkpoint["model"].items() if hasattr(v, "shape")}
            wrong = [f"{k} {theirs[k]} vs {ours[k]}" for k in ours if k in theirs and theirs[k] != ours[k]]
            if wrong:
                raise CheckpointMismatchError(
                    f"cannot --resume from {self._path}: {len(wrong)} of its tensors have other shapes than the "
                    f"config's model (checkpoint vs config: {'; '.join(wrong[:3])}); nothing was loaded. Train into "
                    f"another OUTPUT_DIR, or start from its weights with MODEL.WEIGHTS {self._path} without --resume")
        total = len(self.model.state_dict())
        incompatible = super()._load_model(checkpoint)
        mismatched = {k for k, *_ in incompatible.incorrect_shapes}
        missing = [k for k in incompatible.missing_keys if k not in mismatched]  # fvcore lists them in both
        self.last_load_report = LoadReport(
            path=self._path, loaded=total - len(mismatched) - len(missing), total=total,
            shape_mismatches=[(k, tuple(c), tuple(m)) for k, c, m in incompatible.incorrect_shapes],
            missing=missing, unexpected=list(incompatible.unexpected_keys),
        )
        return incompatible

    def _log_incompatible_keys(self, incompatible) -> None:
        report = self.last_load_report
        if report is not None and not report.clean:
            logger.warning(report.summary())

    # ----------------------------------------------------------------------------------------------- saving
    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's save, but atomic (temporary file + rename) and refusing NaN/Inf weights."""
        if not self.save_dir or not self.save_to_disk:
            return
        bad = [k for k, v in self.model.state_dict().items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteWeightsError(
                f"not saving checkpoint {name}: {len(bad)} model tensors hold NaN/Inf (e.g. {', '.join(bad[:3])}); "
                "the previous checkpoint is kept. Lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS and resume.")
        data = {"model": self.model.state_dict()}
        if self.architecture is not None:
            data["architecture"] = dict(self.architecture)
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        os.makedirs(self.save_dir, exist_ok=True)
        self._remove_stale_temporaries()
        self.logger.info("Saving checkpoint to {}".format(save_file))
        atomic_write(save_file, lambda f: torch.save(data, f), fsync=self.fsync)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename),
                     binary=False, fsync=self.fsync)

    def _remove_stale_temporaries(self) -> None:
        """Delete ``.<name>.<pid>.tmp`` files left by processes killed during a save (not by live ones)."""
        try:
            names = os.listdir(self.save_dir)
        except OSError:
            return
        for name in names:
            match = _TMP_PATTERN.match(name)
            if match and int(match.group("pid")) != os.getpid() and not _pid_alive(int(match.group("pid"))):
                try:
                    os.remove(os.path.join(self.save_dir, name))
                    self.logger.info(f"Removed {name}, a partial checkpoint left by an interrupted run")
                except OSError:
                    pass


def load_weights(model: torch.nn.Module, path: str, *, use_ema: bool = False, source: str = "MODEL.WEIGHTS",
                 allow_pickle: bool = False, require_complete: bool = False) -> Dict[str, Any]:
    """Load ``path`` into ``model`` for inference; with ``use_ema``, its ``model_ema`` weights where it has them.

    With ``require_complete``, an empty ``path`` or a checkpoint that leaves any model tensor missing or of another
    shape raises :class:`CheckpointMismatchError` (evaluating such a model reports the AP of random weights).
    Returns the checkpoint's other entries. A checkpoint without EMA weights gives a warning and its model weights.
    """
    from .ema import unwrap_model

    if require_complete and not path:
        raise CheckpointMismatchError(
            f"{source} is empty: there are no weights to evaluate; set MODEL.WEIGHTS to a trained checkpoint "
            "(or pass --allow-random-weights to run a randomly initialised model on purpose)")
    checkpointer = DiffusionInstCheckpointer(unwrap_model(model), allow_pickle=allow_pickle)
    extra = checkpointer.load(path, checkpointables=[], source=source)
    if use_ema:
        if "model_ema" in extra:
            checkpointer._path = f"{path} (EMA weights)"
            checkpointer._log_incompatible_keys(checkpointer._load_model({"model": extra.pop("model_ema")}))
            logger.info("Loaded the EMA weights of %s", path)
        else:
            logger.warning("MODEL_EMA.ENABLED is set but %s holds no EMA weights; using its model weights", path)
    report = checkpointer.last_load_report
    if require_complete and report is not None and (report.missing or report.shape_mismatches):
        lines = report.summary().splitlines()
        raise CheckpointMismatchError(
            f"{source}: {lines[0]} {' '.join(line.strip() for line in lines[1:3])} ... Evaluating this model would "
            "measure random weights; use the checkpoint of this config (or pass --allow-random-weights)")
    return extra


# Config keys that fix the model a checkpoint belongs to (recorded in checkpoints, compared on --resume).
ARCHITECTURE_KEYS = (
    "MODEL.BACKBONE.NAME", "MODEL.RESNETS.DEPTH", "MODEL.SWIN.SIZE", "MODEL.FPN.OUT_CHANNELS",
    "MODEL.DiffusionInst.NUM_CLASSES", "MODEL.DiffusionInst.NUM_PROPOSALS", "MODEL.DiffusionInst.HIDDEN_DIM",
    "MODEL.DiffusionInst.NUM_HEADS", "MODEL.DiffusionInst.FILTER_DENOISING",
)


def architecture(cfg) -> Dict[str, Any]:
    """The values of :data:`ARCHITECTURE_KEYS` in ``cfg`` (keys it does not have are left out)."""
    values = {}
    for key in ARCHITECTURE_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is not None:
            values[key] = list(node) if isinstance(node, tuple) else node
    return values


def check_architecture(ours: Optional[Dict[str, Any]], theirs: Optional[Dict[str, Any]], path: str) -> None:
    """Refuse to resume from a checkpoint recorded with other architecture keys, naming each key and both values."""
    if not ours or not theirs:
        return
    diffs = [f"{k} {theirs[k]!r} (the config has {ours[k]!r})" for k in ARCHITECTURE_KEYS
             if k in ours and k in theirs and ours[k] != theirs[k]]
    if diffs:
        raise CheckpointMismatchError(
            f"cannot --resume from {path}: it was trained with {', '.join(diffs)}; nothing was loaded. Train into "
            f"another OUTPUT_DIR, or start from its weights with MODEL.WEIGHTS {path} without --resume")
