"""tools/train_net.py end to end on a small shapes dataset: train + evaluate, --eval-only, kill and --resume, 2 processes."""
from __future__ import annotations

import pytest

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from conftest import CONFIGS, ROOT, TINY_OPTS

CONFIG = str(CONFIGS / "diffinst.shapes.res18.cpu.yaml")
TRAIN_NET = str(ROOT / "tools" / "train_net.py")


def command(output_dir, *opts, flags=()) -> list:
    """train_net.py on the tiny shapes model, writing to output_dir."""
    base = [str(o) for o in TINY_OPTS] + [
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.BASE_LR", "0.0002", "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", str(output_dir),
    ]
    return [sys.executable, TRAIN_NET, "--config-file", CONFIG, *flags, *base, *[str(o) for o in opts]]


def run(cmd, shapes_root, timeout=300) -> str:
    env = dict(os.environ, DETECTRON2_DATASETS=shapes_root, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def predictions(output_dir) -> list:
    with open(os.path.join(output_dir, "inference", "shapes_val", "coco_instances_results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_train_evaluate_then_eval_only_reproduces(tmp_path, shapes_root):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    log = run(command(train_dir, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 3, "MODEL_EMA.ENABLED", True), shapes_root)
    assert "Evaluation results for segm" in log and "Evaluation results for bbox" in log
    ckpt = torch.load(train_dir / "model_final.pth", map_location="cpu", weights_only=False)
    assert {"model", "trainer", "iteration", "model_ema"} <= set(ckpt)
    assert ckpt["iteration"] == 5
    assert ckpt["trainer"]["_trainer"]["optimizer"]["state"], "optimizer state must be checkpointed"
    assert ckpt["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 6
    # The EMA differs from the raw weights after 6 updates, so evaluating it is a real choice.
    assert any(not torch.equal(ckpt["model"][k], v) for k, v in ckpt["model_ema"].items() if v.is_floating_point())

    log = run(command(eval_dir, "MODEL.WEIGHTS", train_dir / "model_final.pth", "MODEL_EMA.ENABLED", True,
                      flags=["--eval-only"]), shapes_root)
    assert "Evaluation results for segm" in log
    trained, evaluated = predictions(train_dir), predictions(eval_dir)
    assert trained, "the tiny model should predict something on the val images"
    assert evaluated == trained


@pytest.mark.slow
def test_kill_then_resume_restores_state_and_finishes(tmp_path, shapes_root):
    out = tmp_path / "run"
    opts = ["SOLVER.MAX_ITER", 400, "SOLVER.CHECKPOINT_PERIOD", 4, "MODEL_EMA.ENABLED", True]
    env = dict(os.environ, DETECTRON2_DATASETS=shapes_root, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command(out, *opts), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / "model_0000007.pth").exists():
            assert proc.poll() is None and time.time() < deadline, "training died or stalled before its 2nd checkpoint"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "model_final.pth").exists()
    last = (out / "last_checkpoint").read_text().strip()
    saved = torch.load(out / last, map_location="cpu", weights_only=False)

    # --resume restores model, optimizer, scheduler, EMA and iteration: with no iteration left (MAX_ITER is the
    # checkpoint's iteration + 1), model_final is written from exactly the restored state.
    rest = tmp_path / "restored"
    shutil.copytree(out, rest)
    run(command(rest, *opts, "SOLVER.MAX_ITER", saved["iteration"] + 1, flags=["--resume"]), shapes_root)
    restored = torch.load(rest / "model_final.pth", map_location="cpu", weights_only=False)
    assert restored["iteration"] == saved["iteration"]
    for name, value in saved["model"].items():
        assert torch.equal(restored["model"][name], value), name
    for name, value in saved["model_ema"].items():
        assert torch.equal(restored["model_ema"][name], value), name
    restored_opt, saved_opt = restored["trainer"]["_trainer"]["optimizer"], saved["trainer"]["_trainer"]["optimizer"]
    assert restored_opt["state"].keys() == saved_opt["state"].keys() and restored_opt["state"]
    for key, state in saved_opt["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(restored_opt["state"][key][field]), torch.as_tensor(value)), (key, field)
    assert restored["trainer"]["hooks"]["LRScheduler"] == saved["trainer"]["hooks"]["LRScheduler"]

    # And the command line run continues from there and finishes the (shortened) schedule.
    log = run(command(out, *opts, "SOLVER.MAX_ITER", saved["iteration"] + 3, flags=["--resume"]), shapes_root)
    assert f"Loading trainer from {out / last}" in log or f"from {out / last}" in log
    assert f"Starting training from iteration {saved['iteration'] + 1}" in log
    assert (out / "model_final.pth").exists()


@pytest.mark.slow
def test_two_process_cpu_training_and_evaluation(tmp_path, shapes_root):
    out = tmp_path / "ddp"
    log = run(command(out, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 100, flags=["--num-gpus", "2"]),
              shapes_root)
    assert "world size: 2" in log.lower() or "Rank of current process: 1" in log
    assert "Evaluation results for segm" in log
    assert (out / "model_final.pth").exists()
    assert len({p["image_id"] for p in predictions(out)}) == 4  # both ranks' images were gathered


@pytest.mark.slow
def test_float16_amp_on_cpu_is_refused_with_the_key_named(tmp_path, shapes_root):
    env = dict(os.environ, DETECTRON2_DATASETS=shapes_root)
    proc = subprocess.run(command(tmp_path, "SOLVER.AMP.ENABLED", True), env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "SOLVER.AMP.ENABLED" in proc.stderr and "SOLVER.AMP.DTYPE bfloat16" in proc.stderr


@pytest.mark.slow
def test_bfloat16_training_on_cpu(tmp_path, shapes_root):
    out = tmp_path / "bf16"
    log = run(command(out, "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.DTYPE", "bfloat16", "SOLVER.MAX_ITER", 3,
                      "SOLVER.CHECKPOINT_PERIOD", 100), shapes_root)
    assert "Evaluation results for segm" in log and (out / "model_final.pth").exists()
    assert "GradScaler" not in log  # detectron2's CUDA scaler, replaced, warns no more
    with open(out / "metrics.json") as f:
        losses = [json.loads(line)["total_loss"] for line in f if "total_loss" in line]
    assert losses and all(v == v and abs(v) < 1e4 for v in losses)  # finite


def test_mixed_precision_step_autocasts_and_steps():
    """One step: the forward runs under autocast with the dtype asked for, the loss is scaled by the trainer's
    scaler (a pass-through on CPU), the optimizer steps and the metrics are written."""
    from diffusioninst.engine import amp_grad_scaler, mixed_precision_step

    seen = {}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def forward(self, batch):
            seen["autocast"] = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            out = self.layer(batch[0])
            seen["dtype"] = out.dtype
            return {"loss_a": out.float().pow(2).mean(), "loss_b": out.float().abs().mean()}

    class FakeTrainer:
        model = Model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        grad_scaler = amp_grad_scaler(torch.bfloat16, "cpu")
        _data_loader_iter = iter([[torch.randn(3, 4)]])
        written = []

        def _write_metrics(self, loss_dict, data_time):
            self.written.append(sorted(loss_dict))

    trainer = FakeTrainer()
    before = trainer.model.layer.weight.detach().clone()
    mixed_precision_step(trainer, torch.bfloat16, "cpu")
    assert seen == {"autocast": (True, torch.bfloat16), "dtype": torch.bfloat16}
    assert not trainer.grad_scaler.is_enabled() and not amp_grad_scaler(torch.bfloat16, "cuda").is_enabled()
    if torch.cuda.is_available():  # (without a GPU torch disables a CUDA scaler itself, with a warning)
        assert amp_grad_scaler(torch.float16, "cuda").is_enabled()
    assert not torch.equal(trainer.model.layer.weight, before) and trainer.written == [["loss_a", "loss_b"]]
