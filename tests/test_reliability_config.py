"""Config mistakes give errors that name the file, the key, the closest valid key and what to change."""
from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from detectron2.config import get_cfg

from conftest import CONFIGS, ROOT, TINY_OPTS
from diffusioninst import add_diffusioninst_config
from diffusioninst.config import (
    ConfigError, ConfigFileNotFoundError, UnknownConfigKeyError, check_config, closest_keys, config_keys,
    merge_config,
)

SHAPES = str(CONFIGS / "diffinst.shapes.res18.cpu.yaml")


def fresh():
    cfg = get_cfg()
    add_diffusioninst_config(cfg)
    return cfg


def write(tmp_path, name, text) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("key, expected", [
    ("MODEL.DiffusionInst.NUM_PROPOSAL", "MODEL.DiffusionInst.NUM_PROPOSALS"),
    ("MODEL.NUM_PROPOSALS", "MODEL.DiffusionInst.NUM_PROPOSALS"),
    ("MODEL.DifusionInst.SAMPLE_STEP", "MODEL.DiffusionInst.SAMPLE_STEP"),
    ("SOLVER.BASE_LRR", "SOLVER.BASE_LR"),
])
def test_unknown_command_line_key_names_the_closest_valid_key(key, expected):
    with pytest.raises(UnknownConfigKeyError) as info:
        merge_config(fresh(), SHAPES, [key, "3"])
    assert key in str(info.value) and f"did you mean {expected}?" in str(info.value)
    assert isinstance(info.value, KeyError)  # still what detectron2 raises for unknown keys
    assert closest_keys(key, config_keys(fresh())) == [expected]


def test_unknown_key_in_a_yaml_names_the_file_that_sets_it(tmp_path):
    base = write(tmp_path, "base.yaml", f"_BASE_: {SHAPES}\nMODEL:\n  DiffusionInst:\n    NUM_PROPOSAL: 7\n")
    child = write(tmp_path, "child.yaml", "_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 5\n")
    with pytest.raises(UnknownConfigKeyError) as info:
        merge_config(fresh(), child)
    text = str(info.value)
    assert "MODEL.DiffusionInst.NUM_PROPOSAL " in text and base in text and child not in text
    assert "did you mean MODEL.DiffusionInst.NUM_PROPOSALS?" in text


def test_wrong_types_name_the_key_the_expected_type_and_the_source(tmp_path):
    with pytest.raises(ConfigError, match=r"SOLVER.BASE_LR must be a float .* command line gives the int 1; "
                                          r"write it as a float, e.g. 1.0"):
        merge_config(fresh(), SHAPES, ["SOLVER.BASE_LR", "1"])
    with pytest.raises(ConfigError, match=r"SOLVER.MAX_ITER must be an int .* gives the str many"):
        merge_config(fresh(), SHAPES, ["SOLVER.MAX_ITER", "many"])
    with pytest.raises(ConfigError, match=r"INPUT.MIN_SIZE_TRAIN must be a tuple .*write a list"):
        merge_config(fresh(), SHAPES, ["INPUT.MIN_SIZE_TRAIN", "96"])
    bad = write(tmp_path, "lr.yaml", f"_BASE_: {SHAPES}\nSOLVER:\n  BASE_LR: 1\n")
    with pytest.raises(ConfigError, match=rf"SOLVER.BASE_LR must be a float .* {bad} gives the int 1"):
        merge_config(fresh(), bad)


def test_malformed_overrides_and_groups():
    with pytest.raises(ConfigError, match="KEY VALUE pairs; 'SOLVER.MAX_ITER' has no value"):
        merge_config(fresh(), SHAPES, ["SOLVER.MAX_ITER"])
    with pytest.raises(UnknownConfigKeyError,
                       match=r"MODEL.DiffusionInst is a group of keys.*ACTIVATION, ALPHA.*MODEL.DiffusionInst.<KEY> VALUE"):
        merge_config(fresh(), SHAPES, ["MODEL.DiffusionInst", "3"])


def test_missing_and_unparsable_files_are_named(tmp_path):
    with pytest.raises(ConfigFileNotFoundError, match=r"diffinst.shapes.res18.yaml' does not exist.*"
                                                      r"similar files in .*diffinst.shapes.res18.cpu.yaml"):
        merge_config(fresh(), str(CONFIGS / "diffinst.shapes.res18.yaml"))
    orphan = write(tmp_path, "orphan.yaml", "_BASE_: missing-base.yaml\n")
    with pytest.raises(ConfigFileNotFoundError, match=r"orphan.yaml: a file it inherits \(_BASE_\) is missing.*"
                                                      r"missing-base.yaml"):
        merge_config(fresh(), orphan)
    broken = write(tmp_path, "broken.yaml", "MODEL:\n  DEVICE: [cpu\n")
    with pytest.raises(ConfigError, match=r"(?s)broken.yaml .*is not valid YAML.*line 2"):
        merge_config(fresh(), broken)
    not_a_mapping = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml cannot be used as a detectron2 config"):
        merge_config(fresh(), not_a_mapping)


def test_valid_config_merges_as_before():
    cfg = merge_config(fresh(), SHAPES, [*map(str, TINY_OPTS), "SOLVER.BASE_LR", "0.5"])
    reference = fresh()
    reference.merge_from_file(SHAPES)
    reference.merge_from_list([*map(str, TINY_OPTS), "SOLVER.BASE_LR", "0.5"])
    assert cfg == reference
    check_config(cfg)


def test_check_config_lists_every_problem_with_its_key():
    cfg = merge_config(fresh(), SHAPES, [
        "MODEL.DiffusionInst.NUM_PROPOSALS", "0", "MODEL.DiffusionInst.SAMPLE_STEP", "0",
        "MODEL.DiffusionInst.NUM_CLASSES", "0", "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbon",
        "SOLVER.AMP.ENABLED", "True",
    ])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    text = str(info.value)
    for expected in ("MODEL.DiffusionInst.NUM_PROPOSALS must be at least 1, got 0",
                     "MODEL.DiffusionInst.SAMPLE_STEP must be at least 1, got 0",
                     "MODEL.DiffusionInst.NUM_CLASSES must be at least 1, got 0",
                     "MODEL.BACKBONE.NAME 'build_resnet_fpn_backbon' is not registered",
                     "build_swin_fpn_backbone",  # the registered names are listed
                     "did you mean build_resnet_fpn_backbone?",
                     "SOLVER.AMP.ENABLED with float16 needs a GPU", "or SOLVER.AMP.DTYPE bfloat16"):
        assert expected in text, (expected, text)


def test_check_config_other_mistakes():
    cfg = merge_config(fresh(), SHAPES, ["MODEL.DiffusionInst.HIDDEN_DIM", "100", "MODEL.DiffusionInst.NHEADS", "8",
                                         "MODEL.DiffusionInst.SAMPLE_STEP", "2000", "SOLVER.CHECKPOINT_PERIOD", "0"])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    text = str(info.value)
    assert "HIDDEN_DIM (100) must be divisible by NHEADS (8)" in text
    assert "HIDDEN_DIM (100) must equal MODEL.FPN.OUT_CHANNELS (128)" in text
    assert "SAMPLE_STEP (2000) cannot exceed NUM_TIMESTEPS (1000)" in text
    assert "SOLVER.CHECKPOINT_PERIOD must be at least 1, got 0" in text


def _cli(tool, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_command_lines_exit_with_the_message_and_no_traceback(tmp_path):
    proc = _cli("train_net.py", "--config-file", SHAPES, "MODEL.DiffusionInst.NUM_PROPOSAL", "10",
                "OUTPUT_DIR", str(tmp_path))
    assert proc.returncode == 1
    assert "train_net.py: error: command-line override MODEL.DiffusionInst.NUM_PROPOSAL is not a config key; " \
           "did you mean MODEL.DiffusionInst.NUM_PROPOSALS?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.listdir(tmp_path)  # nothing was started

    image = tmp_path / "in" / "image.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    proc = _cli("demo.py", "--config-file", SHAPES, "--input", str(image), "--output", str(tmp_path / "o"),
                "--opts", "MODEL.DiffusionInst.SAMPLE_STEP", "0", *map(str, TINY_OPTS))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "demo.py: error: invalid config:" in proc.stderr and "SAMPLE_STEP must be at least 1" in proc.stderr
