# Two commands on a fresh machine: `make run` and `make test`. Everything else is optional.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TRAIN_VENV := .venv-train
TPY := $(TRAIN_VENV)/bin/python
STAMP := $(VENV)/.installed
INPUT ?= sample/ct
OUTPUT ?= output
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: run test venv train-venv train export evaluate bench package map-image map-run clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

## contour the bundled sample CT into output/
run: $(STAMP)
	ulimit -s 32768; $(VPY) app.py -i $(INPUT) -o $(OUTPUT)

## the whole test suite (what CI runs)
test: $(STAMP)
	ulimit -s 32768; $(VPY) -m pytest -q

$(TRAIN_VENV)/.installed: requirements-train.txt requirements.txt
	test -x $(TPY) || $(PY) -m venv $(TRAIN_VENV)
	$(TPY) -m pip install -q -r requirements-train.txt
	touch $@

train-venv: $(TRAIN_VENV)/.installed

## train both default models (resumable; see training/README.md)
train: train-venv
	$(TPY) -m training.train --task hn_oar --iterations 5000
	$(TPY) -m training.train --task hn_target --iterations 6000

export: train-venv
	$(TPY) -m training.export --task hn_oar
	$(TPY) -m training.export --task hn_target

## Dice of the exported ONNX models on the 33 OpenKBP validation patients
evaluate: $(STAMP)
	$(VPY) -m training.evaluate --write

clean:
	rm -rf $(OUTPUT) build map-context
