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


def test_wheelhouse_pins_leave_out_torch_and_pin_what_is_installed():
    installer = _load_installer()
    pins = installer.wheelhouse_pins(ROOT / "requirements.txt")
    names = {p.split("==")[0] for p in pins}
    assert not names & {"torch", "torchvision", "triton"} and not any(n.startswith("nvidia") for n in names)
    assert f"numpy=={version('numpy')}" in pins and f"fvcore=={version('fvcore')}" in pins
    assert installer.LVIS_REQ in pins and "opencv-python" not in names  # lvis comes without its dependencies
    assert {"yacs", "timm", "pycocotools", "huggingface-hub"} <= names  # listed lines and their dependencies


def _record_pip(monkeypatch, installer):
    calls = []
    monkeypatch.setattr(installer, "pip", lambda *args, quiet=True: calls.append(list(args)))
    return calls


def test_build_wheelhouse_runs_pip_wheel_on_the_pins_and_the_detectron2_build(tmp_path, monkeypatch):
    installer = _load_installer()
    calls = _record_pip(monkeypatch, installer)
    monkeypatch.setattr(installer, "wheelhouse_pins", lambda path: ["fvcore==0.1.5", "numpy==2.0.0"])
    build = tmp_path / "d2build"
    monkeypatch.setattr(installer, "_detectron2_build_dir", lambda tmp: build)
    dest = tmp_path / "wheels"
    installer.main(["--build-wheelhouse", str(dest)])
    pins = dest / "requirements.txt"
    assert calls == [["wheel", "--no-deps", "--wheel-dir", str(dest), "-r", str(pins)],
                     ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dest), str(build)]]
    assert pins.read_text().split() == ["fvcore==0.1.5", "numpy==2.0.0", "detectron2==0.6"]


@pytest.mark.parametrize("compatible,has_torch_wheels", [(True, False), (False, True), (False, False)])
def test_offline_install_keeps_a_compatible_torch_and_never_asks_an_index(tmp_path, monkeypatch, compatible,
                                                                         has_torch_wheels):
    installer = _load_installer()
    calls = _record_pip(monkeypatch, installer)
    monkeypatch.setattr(installer, "torch_is_compatible", lambda: compatible)
    monkeypatch.setattr(installer, "install_project", lambda: calls.append(["project"]))
    monkeypatch.setattr(installer, "probe", lambda code: True)
    (tmp_path / "requirements.txt").write_text("numpy==2.0.0\ndetectron2==0.6\n")
    if has_torch_wheels:
        for name in ("torch-2.14.1-cp311-none-any.whl", "torchvision-0.29.1-cp311-none-any.whl"):
            (tmp_path / name).write_bytes(b"")
    offline = ["--no-index", "--find-links", str(tmp_path)]
    if not compatible and not has_torch_wheels:
        with pytest.raises(SystemExit, match="no compatible torch"):
            installer.main(["--wheelhouse", str(tmp_path)])
        assert calls == []
        return
    installer.main(["--wheelhouse", str(tmp_path)])
    torch_call = [] if compatible else [["install", *offline, "torch", "torchvision"]]
    assert calls == torch_call + [["install", *offline, "--no-deps", "-r", str(tmp_path / "requirements.txt")],
                                  ["project"]]


def test_this_environments_torch_is_compatible():
    assert _load_installer().torch_is_compatible()
