# One-command entry points. `make demo`: install, make the shapes data, train on CPU, evaluate, draw predictions.
# `make test`: install, then the test suite. Use another interpreter with `make test VENV= PY=python`.
PYTHON ?= python3
VENV ?= .venv
PY ?= $(if $(VENV),$(VENV)/bin/python,python)
SHAPES_CFG ?= configs/diffinst.shapes.res18.cpu.yaml
SHAPES_OUT ?= output/shapes_res18
# After the short CPU schedule the focal-loss scores are low (most below 0.5): the demo draws those above 0.2.
DEMO_THRESHOLD ?= 0.2

.PHONY: install data demo test

install:
	@if [ -n "$(VENV)" ] && [ ! -x "$(VENV)/bin/python" ]; then $(PYTHON) -m venv $(VENV); fi
	$(PY) tools/install.py

data: install
	$(PY) tools/generate_shapes.py

demo: data
	$(PY) tools/train_net.py --config-file $(SHAPES_CFG) OUTPUT_DIR $(SHAPES_OUT)
	$(PY) tools/demo.py --config-file $(SHAPES_CFG) --input datasets/shapes/val --output $(SHAPES_OUT)/demo \
		--confidence-threshold $(DEMO_THRESHOLD) --opts MODEL.WEIGHTS $(SHAPES_OUT)/model_final.pth

test: install
	$(PY) -m pytest -q tests
