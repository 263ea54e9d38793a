"""Runtime failures: a NaN loss, CUDA out-of-memory (simulated), evaluation results on disk, and SIGKILL at
random moments followed by --resume (nothing lost, every checkpoint readable)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from conftest import CONFIGS, ROOT, TINY_OPTS
from diffusioninst.engine import NonFiniteLossError

CONFIG = str(CONFIGS / "diffinst.shapes.res18.cpu.yaml")
TRAIN_NET = str(ROOT / "tools" / "train_net.py")
_spec = importlib.util.spec_from_file_location("train_net_reliability", TRAIN_NET)
train_net = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_net)


def command(output_dir, *opts, flags=()) -> list:
    """train_net.py on the tiny shapes model (as in test_train_net.py), writing to output_dir."""
    base = [str(o) for o in TINY_OPTS] + [
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.BASE_LR", "0.0002", "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", str(output_dir),
    ]
    return [sys.executable, TRAIN_NET, "--config-file", CONFIG, *flags, *base, *[str(o) for o in opts]]


@pytest.fixture
def make_cfg(shapes_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", shapes_root)

    def make(output_dir, *opts, flags=()):
        args = train_net.get_parser().parse_args(command(output_dir, *opts, flags=flags)[2:])
        return train_net.setup(args), args

    return make


def test_nan_loss_stops_with_iteration_and_term_named_and_keeps_the_last_checkpoint(tmp_path, make_cfg):
    cfg, _ = make_cfg(tmp_path, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    criterion = trainer.model.criterion
    original = criterion.forward

    def poisoned(*args, **kwargs):  # the loss diverges in the last iteration
        losses = original(*args, **kwargs)
        if trainer.iter == 5:
            losses["loss_giou"] = losses["loss_giou"] + float("inf")
        return losses

    criterion.forward = poisoned
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    text = str(info.value)
    assert "Non-finite loss at iteration 5: loss_giou=inf" in text and "loss_ce=" in text  # finite terms listed
    assert f"The last checkpoint, {tmp_path / 'model_0000003.pth'}, was written before this and is intact" in text
    assert "--resume" in text and "SOLVER.BASE_LR" in text
    # No checkpoint of the failed state, no final checkpoint, and no "final" evaluation of the failed run.
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".pth")) == ["model_0000001.pth", "model_0000003.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "inference").exists()
    saved = torch.load(tmp_path / "model_0000003.pth", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 3 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_out_of_memory_in_training_names_the_keys_to_change(tmp_path, make_cfg):
    cfg, _ = make_cfg(tmp_path, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    original = trainer._trainer.run_step

    def run_step():
        if trainer.iter == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        original()

    trainer._trainer.run_step = run_step
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        trainer.train()
    text = str(info.value)
    for expected in ("CUDA ran out of memory during training (iteration 2)",
                     "SOLVER.IMS_PER_BATCH (now 2, 2 per GPU)", "INPUT.MAX_SIZE_TRAIN (now 160)",
                     "INPUT.MIN_SIZE_TRAIN (now (96, 112))", "MODEL.DiffusionInst.NUM_PROPOSALS (now 20)",
                     "SOLVER.AMP.ENABLED (now False)", f"The last checkpoint, {tmp_path / 'model_0000001.pth'}",
                     "(PyTorch: CUDA out of memory. Tried to allocate 2.00 GiB)"):
        assert expected in text, (expected, text)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


class _OutOfMemoryModel(nn.Module):
    def forward(self, inputs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")


def test_out_of_memory_in_evaluation_names_the_keys_to_change(tmp_path, make_cfg):
    cfg, _ = make_cfg(tmp_path)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        train_net.Trainer.test(cfg, _OutOfMemoryModel())
    text = str(info.value)
    for expected in ("CUDA ran out of memory during evaluation", "INPUT.MAX_SIZE_TEST (now 160)",
                     "INPUT.MIN_SIZE_TEST (now 96)", "MODEL.DiffusionInst.NUM_PROPOSALS (now 20)",
                     "TEST.AUG.ENABLED (now False)"):
        assert expected in text, (expected, text)


def test_every_evaluation_is_saved_as_json(tmp_path, make_cfg):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    cfg, _ = make_cfg(train_dir, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 100, "TEST.EVAL_PERIOD", 1)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = trainer._last_eval_results
    folder = train_dir / "inference" / "shapes_val"
    latest = json.loads((folder / "results.json").read_text())
    assert latest["dataset"] == "shapes_val" and latest["iteration"] == 1 and latest["ema"] is False
    assert set(latest["results"]) == {"bbox", "segm"} and "AP" in latest["results"]["segm"]
    ap = final["segm"]["AP"]
    assert latest["results"]["segm"]["AP"] == (ap if math.isfinite(ap) else None)  # NaN -> null (strict JSON)
    history = [json.loads(line) for line in (folder / "results_history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == [0, 1]  # the periodic evaluation and the final one

    cfg, args = make_cfg(eval_dir, "MODEL.WEIGHTS", train_dir / "model_final.pth", flags=["--eval-only"])
    train_net.evaluate(cfg, args)
    record = json.loads((eval_dir / "inference" / "shapes_val" / "results.json").read_text())
    assert record["weights"] == str(train_dir / "model_final.pth") and "iteration" not in record
    assert record["results"] == latest["results"]  # same weights, seeded inference: same metrics


def _checkpoint_iteration(out) -> int:
    """The iteration of the checkpoint named by last_checkpoint; -1 when there is none."""
    tag = out / "last_checkpoint"
    if not tag.exists():
        return -1
    return torch.load(out / tag.read_text().strip(), map_location="cpu", weights_only=True)["iteration"]


def _all_checkpoints_load(out) -> None:
    for name in os.listdir(out):
        if name.endswith(".pth"):
            torch.load(out / name, map_location="cpu", weights_only=True)  # raises on a partial file


def _wait_for(predicate, proc, timeout, what, exit_ok=False) -> bool:
    """Poll until ``predicate()``; False if the process ended first and ``exit_ok``."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None and exit_ok:
            return False
        assert proc.poll() is None, f"training exited (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return True


def test_sigkill_at_random_moments_then_resume_loses_nothing(tmp_path, shapes_root):
    out = tmp_path / "run"
    max_iter = 12
    opts = ["SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", 2]
    env = dict(os.environ, DETECTRON2_DATASETS=shapes_root, OMP_NUM_THREADS="1")
    rng = random.Random(0)
    started = re.compile(r"Starting training from iteration (\d+)")
    for attempt in range(3):
        expected_start = _checkpoint_iteration(out) + 1
        log = tmp_path / f"attempt{attempt}.log"
        with open(log, "w") as sink:
            proc = subprocess.Popen(command(out, *opts, flags=["--resume"]), env=env, stdout=sink, stderr=sink)
        try:
            _wait_for(lambda: started.search(log.read_text()), proc, 120, "training started")
            if attempt == 1:  # kill while this process writes a checkpoint (its temporary file exists)
                mine = f".{proc.pid}.tmp"
                _wait_for(lambda: any(n.endswith(mine) for n in os.listdir(out)), proc, 60, "a checkpoint save",
                          exit_ok=True)
            else:
                time.sleep(rng.uniform(0.5, 3.0))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert int(started.search(log.read_text()).group(1)) == expected_start, log.read_text()[-2000:]
        print(f"attempt {attempt}: started at {expected_start}, killed with {sorted(os.listdir(out))}")
        _all_checkpoints_load(out)
        tag = out / "last_checkpoint"
        assert not tag.exists() or (out / tag.read_text().strip()).is_file()

    expected_start = _checkpoint_iteration(out) + 1
    proc = subprocess.run(command(out, *opts, flags=["--resume"]), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Starting training from iteration {expected_start}" in proc.stdout + proc.stderr
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    if expected_start < max_iter:  # the final run saved checkpoints, which removes the killed runs' partial files
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == max_iter - 1
    _all_checkpoints_load(out)
    assert json.loads((out / "inference" / "shapes_val" / "results.json").read_text())["iteration"] == max_iter - 1


def test_kill_between_the_last_checkpoint_and_model_final_still_finishes(tmp_path, shapes_root):
    """The state a kill between the periodic save of the last iteration and model_final leaves: --resume has no
    iteration left, and writes model_final (the last iteration's state) and the final evaluation."""
    out = tmp_path / "run"
    opts = ["SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2]
    env = dict(os.environ, DETECTRON2_DATASETS=shapes_root, OMP_NUM_THREADS="1")
    proc = subprocess.run(command(out, *opts), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = torch.load(out / "model_0000003.pth", map_location="cpu", weights_only=False)
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000003.pth")
    (out / "inference" / "shapes_val" / "results.json").unlink()

    proc = subprocess.run(command(out, *opts, flags=["--resume"]), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting training from iteration 4" in proc.stdout + proc.stderr
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 3 and (out / "last_checkpoint").read_text() == "model_final.pth"
    for name, value in last["model"].items():
        assert torch.equal(final["model"][name], value), name
    assert final["trainer"]["_trainer"]["optimizer"]["state"]
    assert json.loads((out / "inference" / "shapes_val" / "results.json").read_text())["iteration"] == 3
