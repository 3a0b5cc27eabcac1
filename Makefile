# GTSRB on Kubeflow Pipelines. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

include images/images.env
export IMAGE_REGISTRY IMAGE_TAG IMAGE_PREFIX

VENV ?= .venv
PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
DATA_DIR ?= data
EPOCHS ?= 15
BACKENDS ?=
OUTPUT_DIR ?= runs/latest
SAMPLE_DIR ?= ../shared/gtsrb-sample

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: install
install: ## create .venv and install the project with its dev tools
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[dev]'

.PHONY: local
local: ## run the whole pipeline on KFP's local runner (DATA_DIR=..., EPOCHS=..., BACKENDS=a,b)
	$(PYTHON) pipeline.py run-local --data-dir $(DATA_DIR) --epochs $(EPOCHS) --output-dir $(OUTPUT_DIR) \
		$(if $(BACKENDS),--backends $(BACKENDS))

.PHONY: compile
compile: ## compile the pipeline to pipeline.yaml (KFP IR)
	$(PYTHON) pipeline.py compile --output pipeline.yaml

.PHONY: test
test: ## lint + the whole test suite (uses $(SAMPLE_DIR) where real images are needed)
	$(PYTHON) -m ruff check components tests bench pipeline.py
	GTSRB_SAMPLE_DIR=$(SAMPLE_DIR) $(PYTHON) -m pytest -q
