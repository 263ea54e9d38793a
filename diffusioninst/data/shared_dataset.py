"""One serialized copy of a dataset per machine.

detectron2's ``launch`` starts one process per GPU, and each loads, checks and serializes its own copy of the dataset
(``get_detection_dataset_dicts``, then ``DatasetFromList``): for COCO train2017 about 4 GB at its peak and the
serialized list afterwards, times 8 on an 8-GPU node. Here local rank 0 alone loads and checks the records, pickles
them one by one into an anonymous shared-memory file (Linux ``memfd``, sealed read-only), and the machine's other
ranks map that file (through ``/proc/<pid>/fd``) instead of loading: the same records, in the same serialized form
as ``DatasetFromList``'s, once per machine. The metadata that loading sets (classes, class image counts) is sent
to the other ranks with the file's handle.

The file has no name: it lives while a process holds it open or mapped, so the kernel frees it when the run ends,
however it ends (kill -9 included), and nothing is left in ``/dev/shm``. With one process per machine, without
detectron2's local process group, off Linux, or when a rank cannot open the leader's file, each process loads its
own copy as detectron2 does.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import pickle
import socket
import struct
import uuid
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import numpy as np
import torch.utils.data
from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.utils import comm

__all__ = ["SerializedRecords", "get_detection_dataset_shared", "load_once_per_machine"]

logger = logging.getLogger(__name__)

MEMFD_NAME = "diffusioninst-dataset"  # shown as /memfd:diffusioninst-dataset (deleted) in /proc/<pid>/maps
_MAGIC = b"DIFINST1"
_HEADER = struct.Struct("<8s16sqq")  # magic, token (uuid4), number of records, offset of the table of record ends
_WRITE_CHUNK = 1 << 24  # bytes of pickles gathered before each write into the file
_SEALS = ("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE", "F_SEAL_SEAL")


class SerializedRecords(torch.utils.data.Dataset):
    """Records pickled one after the other in a read-only mapping of a ``memfd``: detectron2's serialized
    ``DatasetFromList`` (``copy=False``: every access unpickles a fresh record), in memory that processes share.

    Layout: a header (magic, token, N, table offset), the N pickles, then N int64 end offsets.
    """

    def __init__(self, fd: int):
        """Map ``fd`` (taken over: closed when this object is collected, as the mapping is, so a dataset that is
        dropped, such as a test set reloaded at every evaluation, does not keep its memory)."""
        self._fd = fd
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        magic, token, count, table = _HEADER.unpack_from(self._map, 0)
        if magic != _MAGIC or table + 8 * count != size:
            raise ValueError(f"not a serialized dataset (fd {fd}, {size} bytes)")
        self.token = token
        self._ends = np.frombuffer(self._map, np.int64, count=count, offset=table)
        self._view = memoryview(self._map)
        weakref.finalize(self, os.close, fd)

    @classmethod
    def from_records(cls, records: list) -> SerializedRecords:
        """Pickle ``records`` into a new sealed memfd; each entry of the list is released (set to None) once written,
        so the records and their serialized copy are not both held in full."""
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            ends = np.empty(len(records), np.int64)
            position, chunk = _HEADER.size, bytearray()
            os.lseek(fd, position, os.SEEK_SET)
            for k in range(len(records)):
                data = pickle.dumps(records[k], protocol=pickle.HIGHEST_PROTOCOL)
                records[k] = None
                chunk += data
                position += len(data)
                ends[k] = position
                if len(chunk) >= _WRITE_CHUNK:
                    _write_all(fd, chunk)
                    chunk.clear()
            _write_all(fd, chunk)
            _write_all(fd, ends.tobytes())
            os.pwrite(fd, _HEADER.pack(_MAGIC, uuid.uuid4().bytes, len(ends), position), 0)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, sum(getattr(fcntl, s) for s in _SEALS))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    @classmethod
    def attach(cls, pid: int, fd: int, token: bytes | None = None) -> SerializedRecords:
        """Map the file that process ``pid`` holds open as ``fd`` (on this machine); ``token`` must match if given."""
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            shared = cls(own)
        except BaseException:
            os.close(own)
            raise
        if token is not None and shared.token != token:
            raise ValueError(f"/proc/{pid}/fd/{fd} is not the dataset that was sent (another process's file)")
        return shared

    @property
    def nbytes(self) -> int:
        """Size of the shared file."""
        return len(self._map)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if index < 0:
            index += len(self._ends)
        if not 0 <= index < len(self._ends):
            raise IndexError(f"record {index} of {len(self._ends)}")
        start = int(self._ends[index - 1]) if index else _HEADER.size
        return pickle.loads(self._view[start:int(self._ends[index])])

    def __iter__(self) -> Iterator[Any]:
        return (self[k] for k in range(len(self)))

    def __reduce__(self):  # to a spawned DataLoader worker: it maps the same file (forked ones inherit the mapping)
        return SerializedRecords.attach, (os.getpid(), self._fd, self.token)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _local_layout() -> tuple[int, int] | None:
    """(local rank, processes on this machine) when several processes run per machine under detectron2's launch."""
    if comm.get_world_size() == 1 or not hasattr(os, "memfd_create"):
        return None
    try:
        local_size = comm.get_local_size()
    except AssertionError:  # not started by detectron2's launch: no local process group
        return None
    return (comm.get_local_rank(), local_size) if local_size > 1 else None


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (to be raised on the other ranks too), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001  (any exception type may fail to pickle)
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def load_once_per_machine(load: Callable[[], list], names: Sequence[str]) -> Sequence[dict]:
    """``load()``'s records: a list in a single process; with several processes on a machine, local rank 0 calls
    ``load`` and the others map its serialized copy (:class:`SerializedRecords`) and receive the metadata of the
    datasets ``names`` that loading set. An error on local rank 0 is raised on every rank of the machine."""
    layout = _local_layout()
    if layout is None:
        return load()
    local_rank, local_size = layout
    shared, message, failure = None, None, None
    if local_rank == 0:
        try:
            records = load()
            shared = SerializedRecords.from_records(records)
            del records
            message = {"pid": os.getpid(), "fd": shared._fd, "token": shared.token, "host": socket.gethostname(),
                       "metadata": {n: MetadataCatalog.get(n).as_dict() for n in names}}
            logger.info("dataset %s: %d records serialized into %.1f MiB of shared memory for the %d processes of "
                        "this machine", ", ".join(names), len(shared), shared.nbytes / 2**20, local_size)
        except Exception as exc:  # noqa: BLE001  (raised below, after the other ranks have been told)
            failure = exc
            message = {"error": _portable(exc)}
    gathered = comm.all_gather(message)  # every rank, over detectron2's gloo group (small objects)
    if local_rank == 0:
        if failure is not None:
            raise failure
        return shared
    sent = gathered[comm.get_rank() - local_rank]
    if "error" in sent:
        raise sent["error"]
    for name, values in sent["metadata"].items():
        meta = MetadataCatalog.get(name)
        for key, value in values.items():
            if key != "name" and not hasattr(meta, key):
                setattr(meta, key, value)
    try:
        if sent["host"] != socket.gethostname():
            raise OSError(f"local rank 0 runs on {sent['host']}, this process on {socket.gethostname()}")
        return SerializedRecords.attach(sent["pid"], sent["fd"], sent["token"])
    except (OSError, ValueError) as exc:
        logger.warning("dataset %s: cannot map local rank 0's copy (%s); loading a copy in this process",
                       ", ".join(names), exc)
        return load()


def get_detection_dataset_shared(names: Sequence[str], **kwargs: Any) -> Sequence[dict]:
    """detectron2's ``get_detection_dataset_dicts(names, **kwargs)``, loaded once per machine
    (:func:`load_once_per_machine`): a list in a single process, else a :class:`SerializedRecords` that
    ``build_detection_train_loader`` / ``build_detection_test_loader`` take as their ``dataset``."""
    names = [names] if isinstance(names, str) else list(names)
    return load_once_per_machine(lambda: get_detection_dataset_dicts(names, **kwargs), names)
