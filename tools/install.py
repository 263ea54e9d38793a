#!/usr/bin/env python
"""Install everything DiffusionInst needs into the running Python environment. Idempotent.

detectron2 is not on PyPI, so it is installed by the first of these that works:
  1. an importable detectron2 is kept as it is;
  2. the official repository at a pinned commit (builds the C++/CUDA ops; needs GitHub);
  3. the Python sources of the PyPI sdist pb1-detectron2==0.6 (hash-checked), without compiled ops;
     diffusioninst.compat makes this work on today's Pillow / numpy / setuptools.

Offline (a GPU machine with its own CUDA torch and torchvision and no network):
  --build-wheelhouse DIR  on a connected machine where this installer has run: wheels of every installed
                          dependency except torch and torchvision (and torch's own), pinned to the versions
                          installed here, the detectron2 wheel built from the sdist, and DIR/requirements.txt;
  --wheelhouse DIR        on the offline machine: keeps its torch and torchvision if they are compatible (importable,
                          torch >= MIN_TORCH, torchvision's compiled ops load), installs the rest from DIR only
                          (pip --no-index), then this checkout. The wheels are for this machine's Python and platform.
"""
from __future__ import annotations

import argparse
import hashlib
import html.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
D2_REPO = "https://github.com/facebookresearch/detectron2.git"
D2_COMMIT = "4841e70ee48da72c32304f9ebf98138c2a70048d"
SDIST_NAME = "pb1-detectron2"
SDIST_FILE = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
LVIS_REQ = "lvis==0.5.3"
TORCH_PACKAGES = ("torch", "torchvision")  # the machine's own on a GPU machine: never in the wheelhouse
MIN_TORCH = (2, 4)  # oldest torch a machine's own may be (this project is tested with requirements.txt's pin)
WHEELHOUSE_REQUIREMENTS = "requirements.txt"  # inside the wheelhouse: one name==version per line


def log(msg: str) -> None:
    print(f"[install] {msg}", flush=True)


def pip(*args: str, quiet: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    if quiet:
        cmd.append("-q")
    subprocess.run(cmd, check=True)


def probe(code: str) -> bool:
    """Run ``code`` in a fresh interpreter (so installs made by this process are seen); True if it exits 0."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=tempfile.gettempdir()).returncode == 0


def unmet_requirements(path: Path) -> list[str] | None:
    """The lines of a requirements file that the installed distributions do not satisfy; None if that cannot be told
    here (``packaging`` missing, or a line it cannot parse), so that pip decides."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        return None
    unmet = []
    for line in path.read_text().splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()  # pip's comment rule: "#" at the start or after a space
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            return None
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            unmet.append(line)
            continue
        if not req.specifier.contains(installed, prereleases=True):
            unmet.append(line)
    return unmet


def install_requirements() -> None:
    requirements = ROOT / "requirements.txt"
    unmet = unmet_requirements(requirements)
    if unmet == []:
        log("pip dependencies: every line of requirements.txt is already satisfied; pip not run")
    else:
        missing = f" (not met here: {', '.join(unmet)})" if unmet else ""
        log(f"pip dependencies from requirements.txt{missing}; already satisfied ones are left alone")
        pip("install", "-r", str(requirements))
    if not probe("import lvis"):
        pip("install", "--no-deps", LVIS_REQ)


def detectron2_origin() -> str | None:
    """Where the importable detectron2 lives, or None."""
    out = subprocess.run(
        [sys.executable, "-c", "import detectron2, os; print(os.path.dirname(detectron2.__file__))"],
        capture_output=True, text=True, cwd=tempfile.gettempdir(),
    )
    return out.stdout.strip() if out.returncode == 0 else None


def try_official_repo(timeout: float) -> bool:
    """Path 2: build detectron2 from GitHub at the pinned commit. False at once when GitHub is unreachable."""
    try:
        subprocess.run(["git", "ls-remote", "--exit-code", D2_REPO, "HEAD"], check=True,
                       capture_output=True, timeout=timeout, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except (subprocess.SubprocessError, FileNotFoundError) as exc:
        log(f"official repository unreachable ({type(exc).__name__}); skipping the source build")
        return False
    log(f"building detectron2 from {D2_REPO}@{D2_COMMIT} (compiles C++/CUDA ops, takes minutes)")
    try:
        pip("install", "--no-build-isolation", f"git+{D2_REPO}@{D2_COMMIT}", quiet=False)
    except subprocess.CalledProcessError:
        log("source build failed; falling back to the sdist")
        return False
    return True


class _LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.extend(v for k, v in attrs if k == "href" and v)


def index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                             capture_output=True, text=True)
        url = out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "https://pypi.org/simple"
    return url.rstrip("/") + "/"


def fetch_sdist(dest: Path) -> Path:
    """Download the sdist through the package index (or take D2_SDIST, a local copy) and check its hash."""
    local = os.environ.get("D2_SDIST")
    if local:
        path = Path(local)
    else:
        page_url = urllib.parse.urljoin(index_url(), f"{SDIST_NAME}/")
        with urllib.request.urlopen(page_url, timeout=60) as resp:
            parser = _LinkParser()
            parser.feed(resp.read().decode())
        links = [l for l in parser.links if urllib.parse.urlparse(l).path.endswith(SDIST_FILE)]
        if not links:
            raise SystemExit(f"[install] {SDIST_FILE} not listed at {page_url}")
        url = urllib.parse.urljoin(page_url, links[0]).split("#")[0]
        path = dest / SDIST_FILE
        log(f"downloading {url}")
        with urllib.request.urlopen(url, timeout=120) as resp, open(path, "wb") as f:
            shutil.copyfileobj(resp, f)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"[install] {path}: sha256 {digest} != expected {SDIST_SHA256}; refusing to install")
    log(f"{path.name}: sha256 verified")
    return path


SETUP_PY = """\
from setuptools import find_packages, setup
setup(
    name="detectron2",
    version="0.6",
    description="detectron2 v0.6 Python sources (pb1-detectron2 sdist), no compiled ops",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={"detectron2.model_zoo": ["configs/*.yaml", "configs/**/*.yaml", "configs/**/*.py"]},
)
"""


def _detectron2_build_dir(tmp: Path) -> Path:
    """A buildable project of detectron2 v0.6's Python sources under ``tmp``, from the hash-checked sdist."""
    sdist = fetch_sdist(tmp)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
    src = tmp / "pb1-detectron2-0.6"
    build = tmp / "build"
    build.mkdir()
    shutil.copytree(src / "detectron2", build / "detectron2")
    shutil.copy(src / "LICENSE", build / "LICENSE")
    (build / "setup.py").write_text(SETUP_PY)
    return build


def install_sdist() -> None:
    """Path 3: install detectron2's Python package from the hash-checked sdist, with no compiled ops."""
    with tempfile.TemporaryDirectory() as tmp:
        build = _detectron2_build_dir(Path(tmp))
        log("installing detectron2 0.6 (Python sources only, no compiled ops)")
        pip("install", "--no-deps", "--no-build-isolation", str(build))


def install_detectron2(allow_source_build: bool, git_timeout: float) -> str:
    origin = detectron2_origin()
    if origin:
        log(f"detectron2: path 1, already importable at {origin}; left as it is")
        return "existing"
    if allow_source_build and try_official_repo(git_timeout):
        log("detectron2: path 2, built from the official repository")
        return "source"
    install_sdist()
    log("detectron2: path 3, pb1-detectron2==0.6 Python sources without compiled ops")
    return "sdist"


def install_project() -> None:
    if probe("import diffusioninst, os, sys; sys.exit(0 if os.path.samefile("
             f"os.path.dirname(diffusioninst.__file__), {str(ROOT / 'diffusioninst')!r}) else 1)"):
        log("diffusioninst: already installed in editable mode from this checkout")
        return
    log("diffusioninst: pip install -e .")
    pip("install", "--no-deps", "--no-build-isolation", "-e", str(ROOT))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheelhouse_pins(requirements: Path) -> list[str]:
    """name==version of every installed distribution that requirements.txt needs, with their dependencies, except
    torch, torchvision and what only they pull in (nvidia-*, triton, ...): the closure walked through the installed
    distributions' metadata, stopping at torch and torchvision; plus lvis (installed without its dependencies)."""
    from importlib.metadata import PackageNotFoundError, distribution
    from packaging.requirements import Requirement

    lines = [re.sub(r"(^|\s)#.*", "", line).strip() for line in requirements.read_text().splitlines()]
    todo = [Requirement(line).name for line in lines if line]
    skip = {_canonical(n) for n in TORCH_PACKAGES}
    pins: dict[str, str] = {}
    while todo:
        name = _canonical(todo.pop())
        if name in skip or name in pins:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"[install] {name} is not installed here: run tools/install.py before building a "
                             "wheelhouse") from None
        pins[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return sorted([f"{name}=={pins[name]}" for name in pins] + [LVIS_REQ])  # lvis: without its dependencies


def build_wheelhouse(dest: Path) -> None:
    """Fill ``dest`` with wheels of the pinned dependencies (building those published only as sdists), the
    detectron2 wheel built from the hash-checked sdist, and ``dest/requirements.txt`` naming them all."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = wheelhouse_pins(ROOT / "requirements.txt")
    pin_file = dest / WHEELHOUSE_REQUIREMENTS
    pin_file.write_text("\n".join(pins) + "\n")
    log(f"wheelhouse: {len(pins)} distributions (torch and torchvision excluded) into {dest}")
    pip("wheel", "--no-deps", "--wheel-dir", str(dest), "-r", str(pin_file))
    with tempfile.TemporaryDirectory() as tmp:
        build = _detectron2_build_dir(Path(tmp))
        pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dest), str(build))
    pin_file.write_text("\n".join(pins + ["detectron2==0.6"]) + "\n")
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    log(f"wheelhouse: {len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.0f} MiB in {dest}")


def torch_is_compatible() -> bool:
    """Whether this environment's torch and torchvision can be kept: both import, torch >= MIN_TORCH and
    torchvision's compiled ops load (a mismatched pair fails here)."""
    return probe("import sys, torch, torchvision, torchvision.ops; "
                 "v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); "
                 "torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5); "
                 f"sys.exit(0 if v >= {MIN_TORCH!r} else 1)")


def install_from_wheelhouse(wheelhouse: Path) -> None:
    """Offline install: keep a compatible torch (or take torch and torchvision from the wheelhouse if it has them),
    then every pinned distribution from the wheelhouse alone, without resolving dependencies again."""
    pin_file = wheelhouse / WHEELHOUSE_REQUIREMENTS
    if not pin_file.is_file():
        raise SystemExit(f"[install] {pin_file} is missing: build the wheelhouse with --build-wheelhouse DIR")
    offline = ["--no-index", "--find-links", str(wheelhouse)]
    if torch_is_compatible():
        log("torch and torchvision: this machine's own are compatible; kept")
    elif any(wheelhouse.glob("torch-*.whl")) and any(wheelhouse.glob("torchvision-*.whl")):
        log("torch and torchvision: not compatible here; installing the wheelhouse's")
        pip("install", *offline, "torch", "torchvision")
    else:
        raise SystemExit(f"[install] no compatible torch and torchvision here (need torch >= "
                         f"{'.'.join(map(str, MIN_TORCH))} with its matching torchvision), and none in {wheelhouse}")
    log(f"dependencies from {wheelhouse} (no index)")
    pip("install", *offline, "--no-deps", "-r", str(pin_file))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-source-build", action="store_true",
                        help="never try the official repository (skip straight to the sdist)")
    parser.add_argument("--git-timeout", type=float, default=10.0,
                        help="seconds to wait for GitHub before giving up on path 2")
    offline = parser.add_mutually_exclusive_group()
    offline.add_argument("--build-wheelhouse", metavar="DIR", type=Path,
                         help="write the wheels of an offline install to DIR (after installing here) and exit")
    offline.add_argument("--wheelhouse", metavar="DIR", type=Path,
                         help="install offline from DIR (made by --build-wheelhouse), keeping a compatible torch")
    args = parser.parse_args(argv)
    if args.build_wheelhouse:
        build_wheelhouse(args.build_wheelhouse)
        return
    if args.wheelhouse:
        install_from_wheelhouse(args.wheelhouse)
    else:
        install_requirements()
        install_detectron2(not args.no_source_build, args.git_timeout)
    install_project()
    if not probe("import diffusioninst, detectron2"):
        raise SystemExit("[install] 'import diffusioninst, detectron2' fails after installing; see above")
    log("done: 'import diffusioninst, detectron2' works")


if __name__ == "__main__":
    main()
