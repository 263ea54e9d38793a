"""The denoising trajectory (sampler observer, frames) and tools/visualize_denoising.py."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from conftest import CONFIGS, TINY_OPTS, tiny_cfg
from diffusioninst.data import generate_shapes_dataset, shapes_dataset_paths
from diffusioninst.denoising import denoising_frames, draw_frame, save_animation, save_strip
from tools import visualize_denoising

H, W = 96, 128


def _model(steps: int, renewal_threshold: float = 0.5):
    """A tiny model in eval mode whose class scores are spread, so that renewal keeps some proposals."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.DiffusionInst.SAMPLE_STEP", steps,
                                 "MODEL.DiffusionInst.RENEWAL_THRESHOLD", renewal_threshold)).eval()
    with torch.no_grad():
        for stage in model.head.head_series:
            stage.class_logits.bias.normal_(0.0, 2.0)
    return model


def _input() -> dict:
    image = torch.randint(0, 256, (3, H, W), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    return {"image": image, "height": H, "width": W}


def _noise(model, steps: int, seed: int = 7):
    """Initial box signal (1, N, 4) and the later steps' DDIM / renewal noise (steps - 1, 2, 1, N, 4)."""
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(1, model.num_proposals, 4, generator=g)
    later = torch.randn(steps - 1, 2, 1, model.num_proposals, 4, generator=g) if steps > 1 else None
    return init, later


def _observed(model, init, later):
    steps = []
    with model.sampler.observe(steps.append):
        out = model.inference([_input()], init_boxes=init, step_noise=later)[0]["instances"]
    return steps, out


def _signal_to_image_boxes(signal: torch.Tensor) -> torch.Tensor:
    """The boxes a box signal (N, 4 cxcywh in [-2, 2]) stands for in the H x W input, written out independently."""
    c = (signal.clamp(-2.0, 2.0) / 2.0 + 1.0) / 2.0
    x0, y0 = c[:, 0] - c[:, 2] / 2, c[:, 1] - c[:, 3] / 2
    x1, y1 = c[:, 0] + c[:, 2] / 2, c[:, 1] + c[:, 3] / 2
    return torch.stack([x0 * W, y0 * H, x1 * W, y1 * H], dim=1)


@pytest.mark.parametrize("steps", [1, 3])
def test_observing_changes_nothing(steps):
    """An observed inference call gives bit-identical results to a plain one with the same noise."""
    model = _model(steps)
    init, later = _noise(model, steps)
    plain = model.inference([_input()], init_boxes=init, step_noise=later)[0]["instances"]
    recorded, observed = _observed(model, init, later)
    assert len(recorded) == steps
    assert len(plain) > 0
    for field in ("scores", "pred_classes", "pred_masks"):
        assert torch.equal(plain.get(field), observed.get(field)), field
    assert torch.equal(plain.pred_boxes.tensor, observed.pred_boxes.tensor)
    assert model.sampler._observer is None  # the observer is gone after the block


@pytest.mark.parametrize("steps", [1, 4])
def test_frames_from_noise_to_result(steps):
    """steps + 1 frames; frame 0 is the initial noise given, the last frame model.inference's detections."""
    model = _model(steps)
    init, later = _noise(model, steps)
    recorded, observed = _observed(model, init, later)
    frames = denoising_frames(recorded, observed, H, W)
    assert len(frames) == steps + 1
    torch.testing.assert_close(torch.from_numpy(frames[0].boxes), _signal_to_image_boxes(init[0]))
    assert frames[0].scores is None and not frames[0].renewed.any()
    plain = model.inference([_input()], init_boxes=init, step_noise=later)[0]["instances"]
    assert np.array_equal(frames[-1].boxes, plain.pred_boxes.tensor.numpy())
    assert np.array_equal(frames[-1].scores, plain.scores.numpy())
    assert np.array_equal(frames[-1].masks, plain.pred_masks.numpy().astype(bool))
    assert [f.title.split(",")[0] for f in frames[1:]] == [f"step {k}/{steps}" for k in range(1, steps + 1)]
    assert f"t = {recorded[0].t}" in frames[0].title


def test_renewed_proposals_are_marked_where_renewal_happened():
    """With the threshold at the median score of step 1, about half are renewed: exactly those scoring at most the
    threshold are marked, and the next step starts them from the given refill noise."""
    steps = 3
    model = _model(steps)
    init, later = _noise(model, steps)
    first, _ = _observed(model, init, later)
    threshold = float(first[0].logits[0].sigmoid().amax(-1).median())
    model.sampler.renewal_threshold = threshold
    recorded, observed = _observed(model, init, later)
    frames = denoising_frames(recorded, observed, H, W)
    for s in range(steps - 1):
        scores = recorded[s].logits[0].sigmoid().amax(-1)
        renewed = frames[s + 1].renewed
        assert np.array_equal(renewed, (scores <= threshold).numpy())
        assert np.array_equal(frames[s + 1].scores, scores.numpy())
        num_keep = int((~renewed).sum())
        assert 0 < num_keep < model.num_proposals
        # The next step's rows: the kept proposals first (in order), then the renewed rows from the refill noise.
        order = recorded[s].order[0]
        assert torch.equal(order[:num_keep], torch.from_numpy(np.flatnonzero(~renewed)))
        refill = later[s, 1, 0, num_keep:]
        torch.testing.assert_close(recorded[s + 1].boxes_in[0, num_keep:], _signal_to_image_boxes(refill))
    # Without renewal nothing is marked.
    model.sampler.box_renewal = False
    recorded, observed = _observed(model, init, later)
    assert not any(f.renewed.any() for f in denoising_frames(recorded, observed, H, W))


def test_drawing_and_files(tmp_path):
    """Frames are drawn at the requested height; the strip holds them side by side, the GIF one per frame."""
    steps = 2
    model = _model(steps)
    init, later = _noise(model, steps)
    recorded, observed = _observed(model, init, later)
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    pictures = [draw_frame(rgb, f, threshold=0.0, height=64) for f in denoising_frames(recorded, observed, H, W)]
    assert all(p.height > 64 and p.width == round(W * 64 / H) for p in pictures)
    assert np.asarray(pictures[1]).std() > 0
    save_strip(pictures, str(tmp_path / "strip.png"))
    save_animation(pictures, str(tmp_path / "anim.gif"))
    strip = Image.open(tmp_path / "strip.png")
    assert strip.width >= sum(p.width for p in pictures)
    assert Image.open(tmp_path / "anim.gif").n_frames == steps + 1


# --- the command line --------------------------------------------------------------------------------------------

OPTS = [str(o) for o in TINY_OPTS] + ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("denoise_data")
    generate_shapes_dataset(str(root), num_train=0, num_val=1, image_size=64, seed=1)
    return shapes_dataset_paths(str(root), "val")[1]


def _tool(*args: str, weights: str = "") -> int:
    argv = ["--config-file", str(CONFIGS / "diffinst.shapes.res18.cpu.yaml"), *args]
    return visualize_denoising.main([*argv, "--opts", *OPTS, "MODEL.WEIGHTS", weights])


def test_tool_writes_strip_and_animation(image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _tool("--input", image_dir, "--output", str(out), "--steps", "3", "--allow-random-weights") == 0
    (name,) = os.listdir(image_dir)
    stem = out / (os.path.splitext(name)[0] + "_denoising")
    assert Image.open(f"{stem}.gif").n_frames == 4
    assert Image.open(f"{stem}.png").width > 4 * 64
    assert "4 frames" in capsys.readouterr().out


def _one_line_error(capsys, expected: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("visualize_denoising.py: error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert not any("Traceback" in line for line in err)


def test_tool_one_line_errors(image_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert _tool("--input", image_dir, "--output", out, "--steps", "0") == 1
    _one_line_error(capsys, "--steps 0")
    assert _tool("--input", image_dir, "--output", out) == 1  # MODEL.WEIGHTS "" without --allow-random-weights
    _one_line_error(capsys, "MODEL.WEIGHTS")
    assert _tool("--input", image_dir, "--output", out, weights=str(tmp_path / "missing.pth")) == 1
    _one_line_error(capsys, "missing.pth")


def test_tool_reports_an_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert _tool("--input", str(bad), "--output", str(tmp_path / "out"), "--allow-random-weights") == 1
    err = capsys.readouterr().err
    assert "cannot process" in err and "bad.png" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "bad.png" in line]) == 1
