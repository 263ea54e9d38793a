"""tools/gpu_check.py: without a GPU it says so and exits 0; its CPU-vs-CUDA comparison of detections."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import ROOT


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_tool", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check runs the checks")
def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    assert _load().main([]) == 0
    assert "no CUDA GPU on this machine" in capsys.readouterr().out


def test_match_detections_allows_float_tolerance_and_reordering_only():
    match = _load().match_detections
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4], masks[1, 4:], masks[2, :, :2] = True, True, True
    a = {"boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]]), "scores": torch.tensor([0.9, 0.5, 0.4]),
         "classes": torch.tensor([1, 2, 3]), "masks": masks}
    order = torch.tensor([1, 0, 2])
    b = {k: v[order] for k, v in a.items()}
    b["boxes"] = b["boxes"] + 0.01
    assert match(a, b) == 1.0
    b["classes"] = torch.tensor([2, 1, 0])  # the third detection's class differs
    assert match(a, b) == pytest.approx(2 / 3)
    b["classes"], b["masks"] = a["classes"][order], ~b["masks"]
    assert match(a, b) == 0.0
