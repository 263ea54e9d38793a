"""tools/install.py is idempotent: run again in an installed environment, it changes nothing and says why."""
from __future__ import annotations

import pytest

import subprocess
import sys

from conftest import ROOT

pytestmark = pytest.mark.slow  # runs the installer and fresh interpreters


def _freeze() -> list:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    return sorted(out.stdout.splitlines())


def test_second_install_changes_nothing():
    before = _freeze()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "install.py"), "--no-source-build"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "detectron2: path 1, already importable" in proc.stdout
    assert "diffusioninst: already installed in editable mode from this checkout" in proc.stdout
    assert "done: 'import diffusioninst, detectron2' works" in proc.stdout
    assert _freeze() == before


def test_compat_is_applied_and_detectron2_packages_import():
    code = ("import diffusioninst, detectron2.data, detectron2.modeling, detectron2.evaluation, detectron2.engine; "
            "from diffusioninst import compat; print(compat.HAS_COMPILED_OPS)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() in ("True", "False")
