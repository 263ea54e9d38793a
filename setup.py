"""DiffusionInst: diffusion model for instance segmentation, as a detectron2 project.

detectron2 is not on PyPI; run ``python tools/install.py`` (or ``make install``), which installs it.
"""
from setuptools import find_packages, setup

setup(
    name="diffusioninst",
    version="0.1.0",
    description="DiffusionInst (arXiv 2212.02773) on detectron2: faithful, checkpoint-compatible, batched",
    packages=find_packages(include=["diffusioninst", "diffusioninst.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "numpy",
        "opencv-python-headless",
        "fvcore",
        "iopath",
        "pycocotools",
        "faster-coco-eval",
        "timm",
    ],
    extras_require={"onnx": ["onnx", "onnxruntime"]},  # tools/export_model.py, OnnxPredictor, demo --onnx
)
