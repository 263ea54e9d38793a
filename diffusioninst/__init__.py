"""DiffusionInst: instance segmentation as denoising of boxes and instance-aware filters (arXiv 2212.02773)."""
from . import compat

compat.apply()
