"""Checkpoints: missing/corrupt files named, mismatches summarised, saves atomic, NaN weights never saved."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from conftest import tiny_cfg
from diffusioninst import checkpoint as ckpt_module
from diffusioninst.checkpoint import (
    CheckpointNotFoundError, CorruptCheckpointError, DiffusionInstCheckpointer, NonFiniteWeightsError, atomic_write,
    load_weights,
)
from diffusioninst.ema import ModelEMA


def tiny_model(*opts):
    torch.manual_seed(0)
    return build_model(tiny_cfg(*opts))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model (4 classes) saved as model_0000001.pth with EMA weights, in its own folder."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = tiny_model()
    ema = ModelEMA(model, 0.5)
    with torch.no_grad():
        for value in ema.state.values():
            if value.is_floating_point():
                value.add_(1.0)  # EMA weights that differ from the model's
    DiffusionInstCheckpointer(model, str(folder), model_ema=ema).save("model_0000001", iteration=1)
    return folder, model, ema


def test_missing_weights_file_is_a_file_not_found_error_naming_the_key(tmp_path):
    missing = str(tmp_path / "nope" / "model_final.pth")
    with pytest.raises(CheckpointNotFoundError) as info:
        load_weights(tiny_model(), missing)
    assert isinstance(info.value, FileNotFoundError)
    assert f"MODEL.WEIGHTS: checkpoint file {missing!r} does not exist" in str(info.value)
    assert 'or to "" to start from scratch' in str(info.value)


def test_missing_resume_target_names_last_checkpoint(tmp_path, saved):
    (tmp_path / "model_0000001.pth").symlink_to(saved[0] / "model_0000001.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(CheckpointNotFoundError) as info:
        DiffusionInstCheckpointer(tiny_model(), str(tmp_path)).resume_or_load("", resume=True)
    text = str(info.value)
    assert "last_checkpoint" in text and "model_0000009.pth" in text and "model_0000001.pth" in text


@pytest.mark.parametrize("cut", ["empty", "half", "tail", "garbage"])
def test_truncated_or_corrupt_file_is_named_and_called_incomplete(tmp_path, saved, cut):
    data = (saved[0] / "model_0000001.pth").read_bytes()
    broken = tmp_path / "model_final.pth"
    broken.write_bytes({"empty": b"", "half": data[: len(data) // 2], "tail": data[:-20],
                        "garbage": b"not a checkpoint" * 8}[cut])
    with pytest.raises(CorruptCheckpointError) as info:
        load_weights(tiny_model(), str(broken))
    assert f"cannot read checkpoint {broken}: it is incomplete or corrupt" in str(info.value)
    assert str(info.value).startswith("MODEL.WEIGHTS:")


def test_class_count_mismatch_is_summarised_and_the_rest_loaded(saved, caplog):
    folder, source, _ = saved
    model = tiny_model("MODEL.DiffusionInst.NUM_CLASSES", 7)
    checkpointer = DiffusionInstCheckpointer(model)
    with caplog.at_level(logging.WARNING, logger="diffusioninst.checkpoint"):
        checkpointer.load(str(folder / "model_0000001.pth"), checkpointables=[])
    report = checkpointer.last_load_report
    skipped = {k: (c, m) for k, c, m in report.shape_mismatches}
    num_stages = 2  # TINY_OPTS NUM_HEADS
    assert len(skipped) == 2 * num_stages and all("class_logits" in k for k in skipped)
    weight = next(k for k in skipped if k.endswith("weight"))
    assert skipped[weight] == ((4, 64), (7, 64))
    assert not report.missing and not report.unexpected
    text = caplog.text
    assert f"{len(skipped)} keys skipped because of shape mismatch" in text
    assert f"{weight}: (4, 64) -> (7, 64)" in text
    assert "class_logits: MODEL.DiffusionInst.NUM_CLASSES differs: checkpoint 4, model 7" in text
    assert f"loaded {report.total - len(skipped)} of {report.total} model tensors" in text
    # Everything else is the checkpoint's; the classifier keeps its own initialisation.
    own = tiny_model("MODEL.DiffusionInst.NUM_CLASSES", 7).state_dict()
    for name, value in model.state_dict().items():
        expected = own[name] if name in skipped else source.state_dict()[name]
        assert torch.equal(value, expected), name


def test_other_architecture_reports_missing_and_unused_keys(saved, caplog):
    model = tiny_model("MODEL.DiffusionInst.NUM_HEADS", 3, "MODEL.DiffusionInst.HIDDEN_DIM", 32,
                       "MODEL.FPN.OUT_CHANNELS", 32)
    checkpointer = DiffusionInstCheckpointer(model)
    with caplog.at_level(logging.WARNING, logger="diffusioninst.checkpoint"):
        checkpointer.load(str(saved[0] / "model_0000001.pth"), checkpointables=[])
    report = checkpointer.last_load_report
    assert report.missing and report.shape_mismatches
    text = caplog.text
    assert "model keys not in the checkpoint (randomly initialised): head.head_series" in text
    assert f"{len(report.shape_mismatches)} keys skipped because of shape mismatch" in text
    assert "backbone.fpn_lateral2.weight: (64, 64, 1, 1) -> (32, 64, 1, 1)" in text
    assert "besides the classifier differ in shape: the checkpoint is probably for another architecture" in text
    assert "NUM_CLASSES differs" not in text  # same class count


def test_ema_weights_are_loaded_when_asked(saved, caplog):
    folder, _, ema = saved
    model = tiny_model()
    load_weights(model, str(folder / "model_0000001.pth"), use_ema=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema.state[name]), name
    torch.save({"model": model.state_dict()}, folder / "no_ema.pth")
    with caplog.at_level(logging.WARNING, logger="diffusioninst.checkpoint"):
        load_weights(tiny_model(), str(folder / "no_ema.pth"), use_ema=True)
    assert "holds no EMA weights" in caplog.text


def test_interrupted_save_keeps_the_previous_checkpoint_and_tag(tmp_path, monkeypatch):
    model = tiny_model()
    checkpointer = DiffusionInstCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()

    def dies_half_way(data, f):
        f.write(b"PK\x03\x04 partial bytes")
        raise KeyboardInterrupt  # stands in for the process dying in the middle of torch.save

    monkeypatch.setattr(ckpt_module.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000003", iteration=3)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # temp file removed too
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == before

    # Overwriting a checkpoint of the same name is atomic too: the old file stays whole until the rename.
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000001", iteration=1)
    assert (tmp_path / "model_0000001.pth").read_bytes() == before


def test_temp_files_of_killed_saves_are_ignored_and_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model_0000005.pth.{dead.pid}.tmp"
    stale.write_bytes(b"PK partial")
    live = tmp_path / f".model_0000005.pth.{os.getppid()}.tmp"  # a live process's save in progress: left alone
    live.write_bytes(b"PK partial")
    checkpointer = DiffusionInstCheckpointer(tiny_model(), str(tmp_path))
    assert checkpointer.get_all_checkpoint_files() == []
    checkpointer.save("model_0000007", iteration=7)
    assert sorted(os.listdir(tmp_path)) == [live.name, "last_checkpoint", "model_0000007.pth"]
    assert torch.load(tmp_path / "model_0000007.pth", weights_only=True)["iteration"] == 7


def test_atomic_write_failure_leaves_the_old_content(tmp_path):
    path = tmp_path / "last_checkpoint"
    path.write_text("model_0000001.pth")

    def fails(f):
        f.write("model_00000")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), fails, binary=False)
    assert path.read_text() == "model_0000001.pth" and os.listdir(tmp_path) == ["last_checkpoint"]


def test_nan_weights_are_not_saved(tmp_path):
    model = tiny_model()
    checkpointer = DiffusionInstCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    name = next(n for n, p in model.named_parameters() if "class_logits" in n)
    with torch.no_grad():
        dict(model.named_parameters())[name].fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match=rf"not saving checkpoint model_0000003: 1 model tensors hold "
                                                    rf"NaN/Inf \(e.g. {name}\)"):
        checkpointer.save("model_0000003", iteration=3)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
