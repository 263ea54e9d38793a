"""Bad inputs that must never crash, run code or silently do nothing: weights files that would execute code, files
that are not checkpoints, resuming into a model of another shape, evaluating without weights, and the one-line
error style of the command-line tools."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from conftest import CONFIGS, ROOT, TINY_OPTS, tiny_cfg
from diffusioninst.checkpoint import (
    CheckpointMismatchError, CorruptCheckpointError, DiffusionInstCheckpointer, architecture, load_weights,
)
from diffusioninst.engine import check_optimizer_state, check_resume
from diffusioninst.safe_load import UnsafeCheckpointError, load_pickled_weights
from diffusioninst.solver import build_optimizer

SHAPES = str(CONFIGS / "diffinst.shapes.res18.cpu.yaml")


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code a crafted weights file could run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _crafted(tmp_path, suffix: str):
    marker = tmp_path / f"created_by_{suffix[1:]}"
    path = tmp_path / f"weights{suffix}"
    weight = np.zeros((2, 2), np.float32) if suffix == ".pkl" else torch.zeros(2, 2)  # what each format holds
    content = {"model": {"stem.conv1.weight": weight, "evil": _Payload(str(marker))}, "__author__": "x"}
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps(content, protocol=2))
    else:
        torch.save(content, path)
    return path, marker


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_crafted_weights_files_run_nothing(tmp_path, suffix):
    path, marker = _crafted(tmp_path, suffix)
    model = build_model(tiny_cfg())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError, match=rf"{path}.* holds the object \w+\.open"):
        DiffusionInstCheckpointer(model).load(str(path))
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    proc = _cli("convert_pretrained.py", path, tmp_path / "out.pkl")
    _one_line_error(proc, "convert_pretrained.py: error:", str(path), ".open")
    assert not marker.exists() and not (tmp_path / "out.pkl").exists()


def test_trusted_pickles_load_with_the_opt_in_and_plain_array_pickles_without(tmp_path):
    path, marker = _crafted(tmp_path, ".pkl")
    load_pickled_weights(str(path), allow_pickle=True)
    assert marker.exists()  # the opt-in really unpickles everything

    arrays = tmp_path / "arrays.pkl"  # detectron2's ImageNet files: arrays in (ordered) dicts, protocol 2
    from collections import OrderedDict

    blobs = OrderedDict([("conv1_w", np.arange(6, dtype=np.float32).reshape(2, 3)), ("n", np.int64(3))])
    arrays.write_bytes(pickle.dumps({"blobs": blobs, "__author__": "Caffe2", "note": b"bytes"}, protocol=2))
    loaded = load_pickled_weights(str(arrays))
    assert np.array_equal(loaded["blobs"]["conv1_w"], blobs["conv1_w"]) and loaded["blobs"]["n"] == 3


@pytest.mark.parametrize("content", [
    b"hello, I am a text file\n", b"\x80\x02garbage", b"PK\x03\x04not a zip", b"\x89PNG\r\n\x1a\n\x00\x00",
    bytes(range(256)) * 4, b"]", b"(lp0\n.",
])
def test_any_non_checkpoint_content_gives_cannot_read_checkpoint(tmp_path, content):
    path = tmp_path / "model_final.pth"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=rf"MODEL.WEIGHTS: cannot read checkpoint {path}"):
        DiffusionInstCheckpointer(build_model(tiny_cfg())).load(str(path))


def _saved_run(tmp_path, *opts):
    """A checkpoint in tmp_path/run as training writes it (architecture recorded), and its config."""
    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path / "run"), *opts)
    model = build_model(cfg)
    DiffusionInstCheckpointer(model, cfg.OUTPUT_DIR, architecture=architecture(cfg)).save("model_0000001")
    return cfg


@pytest.mark.parametrize("key, value, old", [
    ("MODEL.DiffusionInst.NUM_CLASSES", 5, 4),
    ("MODEL.DiffusionInst.NUM_PROPOSALS", 30, 20),
    ("MODEL.RESNETS.DEPTH", 34, 18),
])
def test_resume_refuses_another_architecture_naming_both_values(tmp_path, key, value, old):
    cfg = _saved_run(tmp_path)
    changed = tiny_cfg("OUTPUT_DIR", cfg.OUTPUT_DIR, key, value)
    with pytest.raises(CheckpointMismatchError, match=rf"cannot --resume from .*model_0000001.pth: it was trained with "
                                                      rf"{key} {old} \(the config has {value}\)"):
        check_resume(changed)
    check_resume(tiny_cfg("OUTPUT_DIR", cfg.OUTPUT_DIR))  # the same config resumes


def test_resume_of_an_unrecorded_checkpoint_compares_shapes_before_loading(tmp_path):
    """A checkpoint without the architecture record (an older run): the class count is read off the classifier, and
    any other shape difference stops the load before a tensor is copied."""
    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path / "old"))
    DiffusionInstCheckpointer(build_model(cfg), cfg.OUTPUT_DIR).save("model_0000001")
    with pytest.raises(CheckpointMismatchError, match=r"NUM_CLASSES 4 \(the config has 7\)"):
        check_resume(tiny_cfg("OUTPUT_DIR", cfg.OUTPUT_DIR, "MODEL.DiffusionInst.NUM_CLASSES", 7))

    other = build_model(tiny_cfg("MODEL.DiffusionInst.DIM_FEEDFORWARD", 96))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"tensors have other shapes .* nothing was loaded"):
        DiffusionInstCheckpointer(other, cfg.OUTPUT_DIR).resume_or_load("", resume=True)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_optimizer_state_of_other_shapes_is_never_loaded():
    small, large = (build_model(tiny_cfg("MODEL.DiffusionInst.NUM_CLASSES", k)) for k in (4, 5))
    cfg = tiny_cfg()
    saved = build_optimizer(cfg, small)
    sum(p.sum() for p in small.parameters()).backward()
    saved.step()
    target = build_optimizer(cfg, large)
    with pytest.raises(CheckpointMismatchError, match=r"optimizer state .* has shape"):
        check_optimizer_state(target, saved.state_dict())
    check_optimizer_state(build_optimizer(cfg, small), saved.state_dict())


def test_evaluation_weights_must_be_complete(tmp_path):
    model = build_model(tiny_cfg())
    with pytest.raises(CheckpointMismatchError, match=r"MODEL.WEIGHTS is empty.*--allow-random-weights"):
        load_weights(model, "", require_complete=True)
    other = tmp_path / "other_classes.pth"
    torch.save({"model": build_model(tiny_cfg("MODEL.DiffusionInst.NUM_CLASSES", 9)).state_dict()}, other)
    with pytest.raises(CheckpointMismatchError, match=r"does not fully match the model.*random weights"):
        load_weights(model, str(other), require_complete=True)
    load_weights(model, str(other))  # fine-tuning loads what fits, with a warning
    same = tmp_path / "same.pth"
    torch.save({"model": model.state_dict()}, same)
    load_weights(build_model(tiny_cfg()), str(same), require_complete=True)


# ---------------------------------------------------------------------------------------------------------
# The command lines: one line naming the culprit, exit status 1, nothing in OUTPUT_DIR lost


def _cli(tool, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _one_line_error(proc, *fragments) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last
    return last


@pytest.mark.slow
def test_command_line_mistakes_are_one_line(tmp_path):
    opts = [*TINY_OPTS, "OUTPUT_DIR", tmp_path / "out"]
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes, not weights")
    _one_line_error(_cli("train_net.py", "--config-file", SHAPES, "--eval-only", *opts, "MODEL.WEIGHTS", text),
                    "train_net.py: error: MODEL.WEIGHTS: cannot read checkpoint", str(text))
    _one_line_error(_cli("train_net.py", "--config-file", SHAPES, "--eval-only", *opts, "MODEL.WEIGHTS", ""),
                    "MODEL.WEIGHTS is empty", "--allow-random-weights")
    proc = _cli("train_net.py", "--config-file", SHAPES, *opts, "MODEL.DEVICE", "gpu")
    assert "MODEL.DEVICE 'gpu' is not a device" in proc.stderr and proc.returncode == 1
    taken = tmp_path / "a_file"
    taken.write_text("x")
    proc = _cli("train_net.py", "--config-file", SHAPES, *TINY_OPTS, "OUTPUT_DIR", taken)
    assert f"OUTPUT_DIR {taken} is a file, not a directory" in proc.stderr and proc.returncode == 1
    _one_line_error(_cli("train_net.py", "--config-file", SHAPES, "SOLVER.MAX_ITER", 5, "--eval-only"),
                    "--eval-only comes after the KEY VALUE overrides", "flags come first")
    _one_line_error(_cli("train_net.py", "--config-file", SHAPES, *opts,
                         "DATASETS.COCO_INSTANCES", "(('mine', 'missing.json', '.'),)", "DATASETS.TRAIN", "('mine',)"),
                    "DATASETS.COCO_INSTANCES[0]: json file of dataset 'mine' not found: missing.json")
    _one_line_error(_cli("generate_shapes.py", "--root", taken), f"--root: {taken} is a file, not a directory")
    assert taken.read_text() == "x"
    _one_line_error(_cli("export_model.py", "--config-file", SHAPES, "--output", tmp_path / "onnx", "--sample-image",
                         text, "--allow-random-weights", *opts, "MODEL.WEIGHTS", ""),
                    f"export_model.py: error: --sample-image {text} is not a readable image", "UnidentifiedImageError")
    for size in ("0x0", "12", "axb"):  # argparse's usage error (exit status 2)
        proc = _cli("benchmark.py", "--config-file", SHAPES, "--image-size", size)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1] == ("benchmark.py: error: argument --image-size: expected HxW with "
                                                        f"positive integers (e.g. 800x1216), got {size!r}")


@pytest.mark.slow
def test_resume_with_another_class_count_refuses_and_keeps_output_dir(tmp_path, shapes_root):
    out = tmp_path / "run"
    env = {"DETECTRON2_DATASETS": shapes_root}
    base = [*TINY_OPTS, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 2, "TEST.EVAL_PERIOD", 0, "OUTPUT_DIR", out]
    proc = _cli("train_net.py", "--config-file", SHAPES, *base, "SOLVER.CHECKPOINT_PERIOD", 1, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()}
    proc = _cli("train_net.py", "--config-file", SHAPES, "--resume", *base, "MODEL.DiffusionInst.NUM_CLASSES", 5,
                env=env)
    _one_line_error(proc, "cannot --resume from", "MODEL.DiffusionInst.NUM_CLASSES 4 (the config has 5)")
    assert {name: (out / name).read_bytes() for name in files} == files  # config.yaml, log and checkpoints as they were


def test_training_loop_logs_user_errors_without_their_traceback(monkeypatch):
    """detectron2's loop logs any exception with its traceback; a user error (NaN loss, a bad image found by a
    DataLoader worker) is logged as its message only, other exceptions keep their traceback."""
    import io
    import logging

    from diffusioninst.engine import NonFiniteLossError
    from diffusioninst.errors import DEBUG_ENV, HideUserErrorTracebacks, user_error_message

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    stream = io.StringIO()
    logger = logging.getLogger("test_hide_user_error_tracebacks")
    logger.addHandler(logging.StreamHandler(stream))
    logger.addFilter(HideUserErrorTracebacks())
    for exc in (NonFiniteLossError(3, {"loss_ce": float("nan")}, {}), RuntimeError("a bug")):
        try:
            raise exc
        except Exception:
            logger.exception("Exception during training:")
    text = stream.getvalue()
    assert "Exception during training: Non-finite loss at iteration 3: loss_ce=nan" in text
    assert text.count("Traceback") == 1 and "RuntimeError: a bug" in text

    from diffusioninst.data import ImageReadError

    wrapped = ImageReadError("Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                             "call last):\n  File \"x.py\", line 1\nImageReadError: cannot read image a.png (image id 7)")
    assert user_error_message(wrapped) == "cannot read image a.png (image id 7)"
