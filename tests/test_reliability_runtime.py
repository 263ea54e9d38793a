"""Runtime failures: a NaN loss, CUDA out-of-memory (simulated), evaluation results on disk, and SIGKILL at
random moments followed by --resume (nothing lost, every checkpoint readable)."""
from __future__ import annotations

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

from conftest import CONFIGS, ROOT, TINY_OPTS

pytestmark = pytest.mark.slow  # each test trains through tools/train_net.py

CONFIG = str(CONFIGS / "diffinst.shapes.res18.cpu.yaml")


def command(output_dir, *opts, flags=()) -> list:
    """train_net.py on the tiny shapes model (as in test_train_net.py), writing to output_dir."""
    base = [str(o) for o in TINY_OPTS] + [
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.BASE_LR", "0.0002", "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", str(output_dir),
    ]
    return [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file", CONFIG, *flags, *base,
            *[str(o) for o in opts]]


@pytest.fixture
def train_net_main(shapes_root, monkeypatch):
    """``tools/train_net.py``'s main(argv) in this process (so that a test can inject a fault), on the shapes data."""
    monkeypatch.setenv("DETECTRON2_DATASETS", shapes_root)
    from tools import train_net

    return lambda output_dir, *opts, flags=(): train_net.main(command(output_dir, *opts, flags=flags)[2:])


def test_nan_loss_stops_with_iteration_and_term_named_and_keeps_the_last_checkpoint(tmp_path, train_net_main,
                                                                                     monkeypatch, capsys):
    from diffusioninst.modeling.criterion import SetCriterion

    original, calls = SetCriterion.forward, []

    def poisoned(self, *args, **kwargs):  # the loss diverges in the last iteration (the sixth training forward)
        losses = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 6:
            losses["loss_giou"] = losses["loss_giou"] + float("inf")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    assert train_net_main(tmp_path, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2) == 1
    text = capsys.readouterr().err.strip().splitlines()[-1]  # one line, no traceback
    assert text.startswith("train_net.py: error: Non-finite loss at iteration 5: loss_giou=inf") and "loss_ce=" in text
    assert f"The last checkpoint, {tmp_path / 'model_0000003.pth'}, was written before this and is intact" in text
    assert "--resume" in text and "SOLVER.BASE_LR" in text
    # No checkpoint of the failed state, no final checkpoint, and no "final" evaluation of the failed run.
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".pth")) == ["model_0000001.pth", "model_0000003.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "inference").exists()
    saved = torch.load(tmp_path / "model_0000003.pth", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 3 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_out_of_memory_in_training_names_the_keys_to_change(tmp_path, train_net_main, monkeypatch):
    from diffusioninst.modeling.meta_arch import DiffusionInst

    original, calls = DiffusionInst.forward, []

    def forward(self, batched_inputs):
        if self.training:
            calls.append(1)
            if len(calls) == 3:  # iteration 2
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, batched_inputs)

    monkeypatch.setattr(DiffusionInst, "forward", forward)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        train_net_main(tmp_path, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2)
    text = str(info.value)
    for expected in ("CUDA ran out of memory during training (iteration 2)",
                     "SOLVER.IMS_PER_BATCH (now 2, 2 per GPU)", "INPUT.MAX_SIZE_TRAIN (now 160)",
                     "INPUT.MIN_SIZE_TRAIN (now (96, 112))", "MODEL.DiffusionInst.NUM_PROPOSALS (now 20)",
                     "SOLVER.AMP.ENABLED (now False)", f"The last checkpoint, {tmp_path / 'model_0000001.pth'}",
                     "(PyTorch: CUDA out of memory. Tried to allocate 2.00 GiB)"):
        assert expected in text, (expected, text)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_out_of_memory_in_evaluation_names_the_keys_to_change(tmp_path, train_net_main, monkeypatch):
    from detectron2.modeling import build_model

    from conftest import tiny_cfg
    from diffusioninst.modeling.meta_arch import DiffusionInst

    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(tiny_cfg()).state_dict()}, weights)

    def inference(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    monkeypatch.setattr(DiffusionInst, "inference", inference)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        train_net_main(tmp_path / "eval", "MODEL.WEIGHTS", weights, flags=["--eval-only"])
    text = str(info.value)
    for expected in ("CUDA ran out of memory during evaluation", "INPUT.MAX_SIZE_TEST (now 160)",
                     "INPUT.MIN_SIZE_TEST (now 96)", "MODEL.DiffusionInst.NUM_PROPOSALS (now 20)",
                     "TEST.AUG.ENABLED (now False)"):
        assert expected in text, (expected, text)


def test_every_evaluation_is_saved_as_json(tmp_path, train_net_main):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    assert train_net_main(train_dir, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 100, "TEST.EVAL_PERIOD", 1) == 0
    folder = train_dir / "inference" / "shapes_val"
    latest = json.loads((folder / "results.json").read_text())
    assert latest["dataset"] == "shapes_val" and latest["iteration"] == 1 and latest["ema"] is False
    assert set(latest["results"]) == {"bbox", "segm"} and "AP" in latest["results"]["segm"]
    ap = latest["results"]["segm"]["AP"]
    assert ap is None or math.isfinite(ap)  # NaN is written as null (strict JSON)
    history = [json.loads(line) for line in (folder / "results_history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == [0, 1]  # the periodic evaluation and the final one
    assert history[-1]["results"] == latest["results"]

    assert train_net_main(eval_dir, "MODEL.WEIGHTS", train_dir / "model_final.pth", flags=["--eval-only"]) == 0
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
