"""One serialized copy of the dataset per machine (diffusioninst/data/shared_dataset.py): the records, the sealed
memfd, two ranks that see the same records from one file, and nothing left behind after kill -9 of a rank."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
from detectron2.data import get_detection_dataset_dicts

from benchmarks.data_loading import record_digest
from diffusioninst.data import SerializedRecords, get_detection_dataset_shared
from diffusioninst.data.shared_dataset import MEMFD_NAME

from conftest import ROOT, register_shapes_at

RANKS_SCRIPT = os.path.join(ROOT, "tests", "shared_dataset_ranks.py")
RECORDS = [{"file_name": f"{k}.jpg", "image_id": k, "annotations": [{"bbox": [k, 0.5, 2, 3], "segmentation": [[
    0.0, 1.0, 2.0, 3.0, 4.0, float(k)]]}] * (k % 3)} for k in range(50)]


def _records():
    return pickle.loads(pickle.dumps(RECORDS))


def test_serialized_records_give_the_records_back():
    records = _records()
    shared = SerializedRecords.from_records(records)
    assert records == [None] * len(RECORDS)  # released as they were written
    assert len(shared) == len(RECORDS) and list(shared) == RECORDS
    assert shared[3] == RECORDS[3] and shared[-1] == RECORDS[-1] and shared[3] is not shared[3]  # fresh copies
    with pytest.raises(IndexError):
        shared[len(RECORDS)]
    assert list(SerializedRecords.from_records([])) == []


def test_the_file_is_sealed_anonymous_and_mapped_by_another_handle():
    shared = SerializedRecords.from_records(_records())
    with pytest.raises(PermissionError):  # F_SEAL_WRITE: no process can change the records
        os.pwrite(shared._fd, b"x", 100)
    assert os.readlink(f"/proc/self/fd/{shared._fd}") == f"/memfd:{MEMFD_NAME} (deleted)"  # no name in /dev/shm
    other = SerializedRecords.attach(os.getpid(), shared._fd, shared.token)  # as another local rank does
    assert list(other) == RECORDS and other._fd != shared._fd
    assert os.fstat(other._fd).st_ino == os.fstat(shared._fd).st_ino
    assert list(pickle.loads(pickle.dumps(shared))) == RECORDS  # a spawned DataLoader worker maps it too
    with pytest.raises(ValueError, match="not the dataset that was sent"):
        SerializedRecords.attach(os.getpid(), shared._fd, b"0" * 16)


def _open_dataset_files() -> int:
    """This process's file descriptors on a shared dataset file (ours and the mappings' own)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += MEMFD_NAME in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed meanwhile
            pass
    return count


def test_a_dropped_dataset_releases_its_file():
    import gc

    before = _open_dataset_files()
    shared = SerializedRecords.from_records(_records())
    other = SerializedRecords.attach(os.getpid(), shared._fd, shared.token)
    assert _open_dataset_files() > before
    del shared, other
    gc.collect()
    assert _open_dataset_files() == before  # nothing keeps the memory alive


def test_data_loader_workers_read_the_mapping():
    import torch.utils.data

    shared = SerializedRecords.from_records(_records())
    loader = torch.utils.data.DataLoader(shared, batch_size=None, num_workers=2, collate_fn=lambda x: x)
    assert sorted((r for r in loader), key=lambda r: r["image_id"]) == RECORDS


def test_one_process_gets_detectron2s_list(shapes_root):
    register_shapes_at(shapes_root)
    records = get_detection_dataset_shared(["shapes_train"], filter_empty=True)
    assert isinstance(records, list) and records == get_detection_dataset_dicts(["shapes_train"], filter_empty=True)


def _launch(out, shapes_root, *args):
    env = dict(os.environ, DETECTRON2_DATASETS=shapes_root)
    return subprocess.Popen([sys.executable, RANKS_SCRIPT, str(out), "shapes_train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rank_info(out, rank):
    with open(out / f"rank{rank}.json") as f:
        return json.load(f)


@pytest.mark.slow
def test_two_ranks_see_the_same_records_from_one_copy(tmp_path, shapes_root):
    proc = _launch(tmp_path, shapes_root)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    leader, other = _rank_info(tmp_path, 0), _rank_info(tmp_path, 1)
    assert leader["loads"] == ["shapes_train"] and other["loads"] == []  # only local rank 0 read the files
    assert leader["type"] == other["type"] == "SerializedRecords" and leader["inode"] == other["inode"]
    register_shapes_at(shapes_root)
    expected = get_detection_dataset_dicts(["shapes_train"], filter_empty=True)
    assert leader["records"] == other["records"] == len(expected)
    assert leader["digest"] == other["digest"] == record_digest(expected)
    assert other["thing_classes"] == leader["thing_classes"] == ["circle", "square", "triangle", "star"]
    assert other["class_image_count"] == leader["class_image_count"] and leader["class_image_count"]
    assert _mappers_of(leader["inode"]) == []  # released when the run ended


@pytest.mark.slow
def test_an_error_of_local_rank_0_is_raised_on_every_rank(tmp_path, shapes_root):
    broken = tmp_path / "datasets"
    shutil.copytree(shapes_root, broken)
    json_file = broken / "shapes" / "annotations" / "instances_train.json"
    json_file.write_text(json_file.read_text()[:1000])  # a truncated copy
    proc = _launch(tmp_path, str(broken))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    leader, other = _rank_info(tmp_path, 0), _rank_info(tmp_path, 1)
    assert leader["loads"] == ["shapes_train"] and other["loads"] == []
    assert leader["error"] == other["error"]
    assert leader["error"].startswith("DatasetValidationError: ") and "not valid JSON" in leader["error"]
    assert str(json_file) in leader["error"]


def _mappers_of(inode: int) -> list:
    """pids of the processes that map the shared dataset file with this inode."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                if any(MEMFD_NAME in line and int(line.split()[4]) == inode for line in f):
                    pids.append(int(pid))
        except OSError:  # the process ended meanwhile
            pass
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1])
def test_kill_9_of_a_rank_leaves_no_shared_memory(tmp_path, shapes_root, killed):
    shm_before = set(os.listdir("/dev/shm"))
    proc = _launch(tmp_path, shapes_root, "--hold", "120")
    deadline = time.time() + 240
    while not all((tmp_path / f"rank{r}.json").exists() for r in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    time.sleep(0.5)  # both files are complete
    ranks = [_rank_info(tmp_path, r) for r in (0, 1)]
    inode = ranks[0]["inode"]
    assert sorted(_mappers_of(inode)) == sorted(r["pid"] for r in ranks)  # one file, mapped by both ranks
    os.kill(ranks[killed]["pid"], signal.SIGKILL)
    proc.communicate(timeout=120)  # the launcher ends the other rank and exits
    assert proc.returncode != 0
    for r in ranks:
        with pytest.raises(ProcessLookupError):
            os.kill(r["pid"], 0)
    assert _mappers_of(inode) == []  # no process holds it: the kernel has freed it
    assert set(os.listdir("/dev/shm")) - shm_before == set()
