# One-command entry points. `make demo`: install, make the shapes data, train on CPU, evaluate, plot, draw predictions
# and the denoising of one validation image.
# `make test`: install, then the test suite. Use another interpreter with `make test VENV= PY=python`.
PYTHON ?= python3
VENV ?= .venv
PY ?= $(if $(VENV),$(VENV)/bin/python,python)
SHAPES_CFG ?= configs/diffinst.shapes.res18.demo.yaml
SHAPES_OUT ?= output/shapes_res18
SEED ?= 0
# Detections drawn by the demo and in predictions.png: those scoring above the usual 0.5. After its short CPU schedule
# the embedded default scores 37-42% of the objects above 0.5; `make demo DEMO_THRESHOLD=0.3` draws more of
# them, with more wrong classes (README).
DEMO_THRESHOLD ?= 0.5
# The validation image whose denoising `make demo` draws (000001.png has no objects), and its sampling steps.
DENOISING_IMAGE ?= datasets/shapes/val/000002.png
DENOISING_STEPS ?= 4

.PHONY: install install-offline data demo test gpu-check

install:
	@if [ -n "$(VENV)" ] && [ ! -x "$(VENV)/bin/python" ]; then $(PYTHON) -m venv $(VENV); fi
	$(PY) tools/install.py

data: install
	$(PY) tools/generate_shapes.py

demo: data
	$(PY) tools/train_net.py --config-file $(SHAPES_CFG) OUTPUT_DIR $(SHAPES_OUT) SEED $(SEED)
	$(PY) tools/plot_metrics.py $(SHAPES_OUT) --threshold $(DEMO_THRESHOLD)
	$(PY) tools/demo.py --config-file $(SHAPES_CFG) --input datasets/shapes/val --output $(SHAPES_OUT)/demo \
		--confidence-threshold $(DEMO_THRESHOLD) --opts MODEL.WEIGHTS $(SHAPES_OUT)/model_final.pth
	$(PY) tools/visualize_denoising.py --config-file $(SHAPES_CFG) --input $(DENOISING_IMAGE) \
		--steps $(DENOISING_STEPS) --output $(SHAPES_OUT)/denoising --confidence-threshold $(DEMO_THRESHOLD) \
		--opts MODEL.WEIGHTS $(SHAPES_OUT)/model_final.pth

test: install
	$(PY) -m pytest -q tests

# On a machine with a CUDA GPU: the cuda tests, CPU-vs-CUDA inference, float16-AMP training, DDP (2 GPUs), the
# benchmark; one table, about 5 minutes. Without a GPU it says so and exits 0 (tools/gpu_check.py). Offline, with the
# machine's own CUDA torch: `make gpu-check VENV= PY=python WHEELHOUSE=DIR` installs the rest from a wheelhouse
# (`tools/install.py --build-wheelhouse DIR` on a connected machine) instead of the package index.
WHEELHOUSE ?=
gpu-check: $(if $(WHEELHOUSE),install-offline,install)
	$(PY) tools/gpu_check.py

install-offline:
	$(PY) tools/install.py --wheelhouse $(WHEELHOUSE)
