# One venv, one install path: everything installs from this repo's own files.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
HEPREG  := $(BIN)/hepreg
CONFIG  ?= configs/demo.yaml
DATA    ?= data/demo
EVENTS  ?= 20000
# glibc allocator settings measured to cut allocator churn in the training loops (see DESIGN notes).
export MALLOC_MMAP_THRESHOLD_ = 33554432
export MALLOC_TRIM_THRESHOLD_ = 68719476736
export MALLOC_TOP_PAD_ = 536870912

.PHONY: setup demo test bench clean

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build from local disk here; GPU nodes bring their own CUDA build (pyproject keeps torch>=2.3).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(DATA)/metadata.yaml: | setup
	$(HEPREG) generate $(DATA) --events $(EVENTS) --seed 1

demo: setup $(DATA)/metadata.yaml
	$(HEPREG) train-assign -c $(CONFIG)
	$(HEPREG) export-embeddings -c $(CONFIG) --overwrite
	$(HEPREG) train-head -c $(CONFIG)
	$(HEPREG) evaluate -c $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(HEPREG) bench

clean:
	rm -rf runs data
