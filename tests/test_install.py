"""tools/install.py is idempotent: run again in an installed environment, it changes nothing and says why."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib.metadata import version

import pytest

from conftest import ROOT


def _load_installer():
    spec = importlib.util.spec_from_file_location("install_tool", ROOT / "tools" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unmet_requirements_reads_pins_ranges_markers_and_comments(tmp_path):
    """The installer skips pip only when every line is met; a wrong pin, a range missed or a missing package is not."""
    unmet_requirements = _load_installer().unmet_requirements
    pytest_version = version("pytest")
    met = tmp_path / "met.txt"
    met.write_text(f"# a comment\npytest=={pytest_version}  # pinned\n\nnumpy>=1\n"
                   "no-such-package-xyz==1.0; python_version < '3'\n")
    assert unmet_requirements(met) == []
    unmet = tmp_path / "unmet.txt"
    url = "no-such-package-abc @ https://example.invalid/abc-1.0-py3-none-any.whl#sha256=00"
    unmet.write_text(f"pytest=={pytest_version}\npytest<1\nno-such-package-xyz==1.0\nnumpy>=1\n{url}  # a URL\n")
    assert unmet_requirements(unmet) == ["pytest<1", "no-such-package-xyz==1.0", url]
    broken = tmp_path / "broken.txt"
    broken.write_text("-e .\n")
    assert unmet_requirements(broken) is None  # pip's own options: let pip read the file
    assert unmet_requirements(ROOT / "requirements.txt") == []  # this environment was made by the installer


def _freeze() -> list:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    return sorted(out.stdout.splitlines())


@pytest.mark.slow  # runs the installer and fresh interpreters
def test_second_install_changes_nothing():
    before = _freeze()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "install.py"), "--no-source-build"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "every line of requirements.txt is already satisfied; pip not run" in proc.stdout
    assert "detectron2: path 1, already importable" in proc.stdout
    assert "diffusioninst: already installed in editable mode from this checkout" in proc.stdout
    assert "done: 'import diffusioninst, detectron2' works" in proc.stdout
    assert _freeze() == before


@pytest.mark.slow  # fresh interpreters
def test_compat_is_applied_and_detectron2_packages_import():
    code = ("import diffusioninst, detectron2.data, detectron2.modeling, detectron2.evaluation, detectron2.engine; "
            "from diffusioninst import compat; print(compat.HAS_COMPILED_OPS)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() in ("True", "False")
