"""Reading weights files without running code from them: a ``.pkl`` (detectron2's convention: dicts, strings, numbers
and numpy arrays) goes through an unpickler that resolves only those types; ``torch.load``'s weights-only errors are
turned into the name of the object refused. Used by the checkpointer (``MODEL.WEIGHTS``) and the converter."""
from __future__ import annotations

import pickle
import re
from typing import Any, Optional

import numpy as np

from .errors import UserError

__all__ = ["UnsafeCheckpointError", "load_pickled_weights", "refused_object"]


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """The checkpoint holds objects other than weights, which loading would have to execute."""



# What a detectron2-style .pkl weights file may contain besides dicts, lists, strings and numbers: numpy arrays,
# dtypes and scalars (as numpy 1 and numpy 2 pickle them) and ordered dicts. Anything else is refused.
_PICKLE_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol 2
    *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
      for name in ("_reconstruct", "scalar")),
}


_NUMPY_2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


class _WeightsUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of :data:`_PICKLE_ALLOWED`, so loading cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise UnsafeCheckpointError(f"{module}.{name}")
        if module == "numpy.core.multiarray" and _NUMPY_2:  # numpy 2 moved it; files keep the old name
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def refused_object(exc: BaseException) -> Optional[str]:
    """The object torch's weights-only unpickler refused (``module.name``), from its error; None for other errors."""
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return match.group(1) if match else None


def load_pickled_weights(path: str, allow_pickle: bool = False) -> Any:
    """Unpickle a ``.pkl`` weights file with :class:`_WeightsUnpickler` (or without restriction if ``allow_pickle``).

    Raises :class:`UnsafeCheckpointError` naming the file and the refused object before anything of it runs.
    """
    with open(path, "rb") as f:
        if allow_pickle:
            return pickle.load(f, encoding="latin1")
        try:
            return _WeightsUnpickler(f, encoding="latin1").load()
        except UnsafeCheckpointError as exc:
            raise UnsafeCheckpointError(
                f"{path} holds the object {exc}, not only weights (arrays, numbers, strings, containers); it was "
                "not loaded, since unpickling it could run code. If you trust the file, allow full unpickling "
                "(MODEL.WEIGHTS_ALLOW_PICKLE True, or --allow-pickle for tools/convert_pretrained.py)"
            ) from None
