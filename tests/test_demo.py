"""tools/demo.py end to end with a tiny randomly initialised model: image folders, globs, single files, videos."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from conftest import CONFIGS, TINY_OPTS
from diffusioninst.data import generate_shapes_dataset, shapes_dataset_paths

from tools import demo  # noqa: E402  (its main(argv) is the command line)

# Random weights (MODEL.WEIGHTS ""), small inputs; threshold 0 so that masks, boxes and labels are drawn.
OPTS = [str(o) for o in TINY_OPTS] + ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.WEIGHTS", ""]
CORRUPT = "corrupt.png"


def run_demo(*args: str) -> int:
    """tools/demo.py's main() on the tiny shapes config, seeded."""
    torch.manual_seed(0)
    argv = ["--config-file", str(CONFIGS / "diffinst.shapes.res18.cpu.yaml"), *args]
    return demo.main([*argv, "--confidence-threshold", "0", "--allow-random-weights", "--opts", *OPTS])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
    """A folder with 3 shapes images (64 px) and one corrupt file with an image extension."""
    root = tmp_path_factory.mktemp("demo_data")
    generate_shapes_dataset(str(root), num_train=0, num_val=3, image_size=64, seed=1)
    folder = shapes_dataset_paths(str(root), "val")[1]
    with open(os.path.join(folder, CORRUPT), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    return folder


def shapes_images(folder: str) -> list[str]:
    """The readable images of the fixture folder."""
    return sorted(f for f in os.listdir(folder) if f.endswith(".png") and f != CORRUPT)


def test_folder_with_corrupt_file(image_dir, tmp_path, capsys):
    out = tmp_path / "nested" / "out"  # created by the demo
    assert run_demo("--input", image_dir, "--output", str(out)) == 1
    captured = capsys.readouterr()
    names = shapes_images(image_dir)
    assert len(names) == 3
    assert sorted(os.listdir(out)) == names
    for name in names:
        drawn = cv2.imread(str(out / name))
        assert drawn is not None and drawn.shape == cv2.imread(os.path.join(image_dir, name)).shape
        assert f"{os.path.join(image_dir, name)}:" in captured.out and "instances in" in captured.out
    assert CORRUPT in captured.err and "cannot read" in captured.err


def test_glob(image_dir, tmp_path):
    first = shapes_images(image_dir)[0]
    assert run_demo("--input", os.path.join(image_dir, first[:-4] + "*"), "--output", str(tmp_path)) == 0
    assert os.listdir(tmp_path) == [first]


def test_single_file_with_output_name(image_dir, tmp_path):
    source = os.path.join(image_dir, shapes_images(image_dir)[-1])
    out = tmp_path / "sub" / "result.png"
    assert run_demo("--input", source, "--output", str(out)) == 0
    assert os.listdir(tmp_path / "sub") == ["result.png"]
    assert cv2.imread(str(out)).shape == cv2.imread(source).shape


def test_never_overwrites_an_input(tmp_path, capsys):
    source = tmp_path / "image.png"
    cv2.imwrite(str(source), np.full((40, 50, 3), 127, np.uint8))
    before = source.read_bytes()
    assert run_demo("--input", str(source), "--output", str(source)) == 1
    assert source.read_bytes() == before
    assert "never overwritten" in capsys.readouterr().err


def test_video(tmp_path, capsys):
    source = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(source, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 48))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for i in range(5):
        frame = np.full((48, 64, 3), 40 * i, np.uint8)
        cv2.circle(frame, (16 + 8 * i, 24), 10, [int(c) for c in rng.integers(0, 256, 3)], -1)
        writer.write(frame)
    writer.release()

    assert run_demo("--video-input", source, "--output", str(tmp_path / "out")) == 0
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == 5 and all(f.shape == (48, 64, 3) for f in frames)
    assert "5 frames" in capsys.readouterr().out


def test_video_refuses_to_overwrite_its_input(tmp_path, capsys):
    source = tmp_path / "clip.mp4"
    source.write_bytes(b"placeholder")
    assert run_demo("--video-input", str(source), "--output", str(source)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("demo.py: error: refusing to overwrite the input")
    assert source.read_bytes() == b"placeholder"


def test_webcam_without_display_needs_output(monkeypatch, capsys):
    monkeypatch.setattr(demo, "has_display", lambda: False)
    assert run_demo("--webcam") == 1
    assert "demo.py: error: no display available" in capsys.readouterr().err


def test_output_that_is_a_file_is_named(image_dir, tmp_path, capsys):
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    assert run_demo("--input", image_dir, "--output", str(taken)) == 1
    assert f"demo.py: error: --output {taken} is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "not a folder"


def test_exactly_one_source():
    with pytest.raises(SystemExit):
        run_demo("--input", "a.png", "--webcam", "--output", "x")
    with pytest.raises(SystemExit):
        run_demo("--output", "x")
