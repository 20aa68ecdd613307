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
MAP_DIR ?= build/map
MAP_OUTPUT ?= build/map-output
MAP_TIMEOUT ?= 1800
MAP_IMAGE ?= localhost/hn-autocontour:$(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' autocontour/__init__.py)-cpu
MAP_RENDER_ARGS ?=

.PHONY: run test test-train venv train-venv train export evaluate evaluate-dicom bench package map-image map-run node clean

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

## the tests that need torch (training networks, deep supervision, export): `make test` skips them
test-train: train-venv
	$(TPY) -m pytest -q tests/test_networks.py

## train both default models, side by side, one thread each (resumes the committed stage in
## training/checkpoints/<task>/state.pt; a clean clone continues where the last run stopped)
TRAIN_TASKS ?= hn_oar hn_target
TRAIN_ARGS ?=
train: train-venv
	mkdir -p training/runs
	pids=""; for t in $(TRAIN_TASKS); do \
	  $(TPY) -m training.train --task $$t --init models/$$t/model.ts $(TRAIN_ARGS) >> training/runs/$$t.log 2>&1 & pids="$$pids $$!"; \
	  echo "training $$t (log: training/runs/$$t.log)"; \
	done; trap 'kill $$pids' INT TERM; wait $$pids

## export the committed stages' best checkpoints into models/ (then `make evaluate`; a model
## worse than the released one on validation is not committed: git checkout models/<task>)
EXPORT_VERSION ?= 2.0.0
export: train-venv
	$(TPY) -m training.export --task hn_oar --version $(EXPORT_VERSION)
	$(TPY) -m training.export --task hn_target --version $(EXPORT_VERSION)

## Dice of the exported ONNX models on the 33 OpenKBP validation patients, stored in each
## model.yaml as its card shows it (hn_oar after the app's post-processing, hn_target raw),
## with the figures without unscorable references beside them (training/reference_qa.py)
evaluate: $(STAMP)
	$(VPY) -m training.evaluate --models hn_oar --write --no-mirror --postprocess --reference-qa
	$(VPY) -m training.evaluate --models hn_target --write --reference-qa

## the whole app (app.py) on the 33 validation patients written as 512 x 512 DICOM, its RTSTRUCT read back
## and scored (6 min); stored beside the model-grid figures in each model.yaml (training/README.md)
evaluate-dicom: $(STAMP)
	ulimit -s 32768; $(VPY) -m training.evaluate_dicom --write

## our app vs the SDK's stock operators on the benchmark CT (docs/benchmark.md); e.g. BENCH_ARGS="--runs 5"
## our app runs in .venv (no torch); the stock SDK chain needs torch + MONAI core: .venv-train
bench: $(STAMP) train-venv
	ulimit -s 32768; $(VPY) bench/run_benchmark.py --stock-python $(TPY) $(BENCH_ARGS)

## MAP (MONAI Application Package); see docs/packaging.md.
## render the MAP build context (Dockerfiles, app.json/pkg.json, app, models, pins) into $(MAP_DIR), offline
package:
	test -x $(VPY) || $(MAKE) venv
	$(VPY) packaging/render_map.py --out $(MAP_DIR) --timeout $(MAP_TIMEOUT) $(MAP_RENDER_ARGS)

## build the CPU MAP image $(MAP_IMAGE) with podman (installs podman/debootstrap if missing)
map-image: package
	MAP_CONTEXT=$(MAP_DIR) MAP_IMAGE=$(MAP_IMAGE) bash packaging/podman.sh build

## run the CPU MAP image on $(INPUT), results in $(MAP_OUTPUT)
map-run:
	MAP_CONTEXT=$(MAP_DIR) MAP_IMAGE=$(MAP_IMAGE) MAP_INPUT=$(INPUT) MAP_OUTPUT=$(MAP_OUTPUT) bash packaging/podman.sh run

## the DICOM node in the foreground: Orthanc + the contouring plugin (docs/deployment.md);
## installs orthanc, orthanc-python and dcmtk with apt-get if missing; configured by AUTOCONTOUR_NODE_*
node: $(STAMP)
	exec bash deploy/orthanc/node.sh run

clean:
	rm -rf $(OUTPUT) build map-context
