# One venv, one install path: everything installs from this repo's own files.
SHELL   := /bin/bash
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
HEPREG  := $(BIN)/hepreg
CONFIG  ?= configs/demo.yaml
DATA    ?= data/demo
EVENTS  ?= 100000
# glibc allocator settings measured to cut allocator churn in the training loops (see docs/allocator.md).
export MALLOC_MMAP_THRESHOLD_ = 33554432
export MALLOC_TRIM_THRESHOLD_ = 68719476736
export MALLOC_TOP_PAD_ = 536870912

.PHONY: setup demo ablation tune finetune test bench gpu-check clean

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build from local disk here; GPU nodes bring their own CUDA build (pyproject keeps torch>=2.3).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,onnx]'
	touch $@

$(DATA)/metadata.yaml: | setup
	$(HEPREG) generate $(DATA) --events $(EVENTS) --seed 1

demo: setup $(DATA)/metadata.yaml
	$(HEPREG) train-assign -c $(CONFIG) --overwrite
	$(HEPREG) export-embeddings -c $(CONFIG) --overwrite
	$(HEPREG) train-head -c $(CONFIG) --overwrite
	$(HEPREG) evaluate -c $(CONFIG) --overwrite

# Every head kind and input option of configs/ablation.yaml on the demo's cache, side by side (after `make demo`)
ABLATION_EPOCHS ?= 8
ablation: setup
	$(HEPREG) train-head -c $(CONFIG) --sweep configs/ablation.yaml --overwrite --set head_train.epochs=$(ABLATION_EPOCHS)
	$(HEPREG) evaluate -c $(CONFIG) --sweep configs/ablation.yaml

# An Optuna search over the head settings of configs/tune_space.yaml from the demo's cache (after `make demo`;
# ≤ 15 minutes on 2 CPU cores): TUNE_TRIALS trials of TUNE_EPOCHS epochs, none started after TUNE_MINUTES, the
# ones behind pruned; then the best head on the test split. `make tune` again continues the study.
TUNE_TRIALS  ?= 12
TUNE_EPOCHS  ?= 6
TUNE_MINUTES ?= 9
tune: setup
	$(HEPREG) tune -c $(CONFIG) --space configs/tune_space.yaml --trials $(TUNE_TRIALS) --timeout $(TUNE_MINUTES) \
	  --set head_train.epochs=$(TUNE_EPOCHS)
	$(HEPREG) evaluate -c $(CONFIG) --head runs/demo/tune/best/best.pt --overwrite

# Stage 1 and the demo's head fine-tuned end to end (finetune: in configs/demo.yaml), then evaluated beside the
# frozen head on the test split (after `make demo`; ~15 minutes on 2 CPU cores)
FINETUNED ?= runs/demo/finetune/best.pt
finetune: setup
	$(HEPREG) finetune -c $(CONFIG) --overwrite
	$(HEPREG) evaluate -c $(CONFIG) --model $(FINETUNED) --overwrite

# the tests spread over the cores (pytest-xdist; `-n 0` to run them in one process)
TEST_WORKERS ?= auto
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=10

bench: setup
	$(HEPREG) bench

# The checks that need a GPU, in one call (< 10 min on one GPU): the `cuda` tests (tests/test_cuda.py; the compiled head step
# and the stacked sweep among them), the quick bench on the GPU, then head training from the bench's cache eager and
# compiled, and its K=8 sweep stacked and unstacked (events/s of each); figures and test lines go to
# $(GPU_OUT)/gpu-check.txt and $(GPU_OUT)/BENCHMARKS.md. Without CUDA the
# tests are skipped with a line saying so and the bench runs on the CPU: the same target passes anywhere.
GPU_OUT ?= runs/gpu-check
# this clone's venv when there is one; else the machine's python3 with its own CUDA torch, into which the
# target installs hepreg (editable, keeping that torch) when it is not importable yet
GPU_PY  ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	@mkdir -p $(GPU_OUT)
	@$(GPU_PY) -c "import hepreg, pytest" 2>/dev/null || $(GPU_PY) -m pip install -q -e '.[test]'
	@set -eo pipefail; { \
	  date -u +"gpu-check %Y-%m-%d %H:%M UTC"; \
	  $(GPU_PY) -c "import torch; print('torch', torch.__version__, '| CUDA:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none: the cuda tests are skipped, the bench runs on the CPU')"; \
	  timeout 300 $(GPU_PY) -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_cuda.py; \
	  dev=$$($(GPU_PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"); \
	  timeout 300 $(GPU_PY) -m hepreg bench --quick --device $$dev --out $(GPU_OUT)/BENCHMARKS.md \
	    --workdir $(GPU_OUT)/work; \
	  [ $$dev = cuda ] || echo "no CUDA device: the compiled head training is not timed"; \
	  for c in $$([ $$dev = cuda ] && echo false true); do \
	    timeout 240 $(GPU_PY) -m hepreg train-head -c $(GPU_OUT)/work/bench.yaml --overwrite \
	      --set head_train.compile=$$c --set head_train.epochs=3 > $(GPU_OUT)/compile-$$c.log 2>&1 \
	      || { tail -5 $(GPU_OUT)/compile-$$c.log; exit 1; }; \
	    echo "head training from the cache, head_train.compile=$$c: events/s per epoch" \
	      $$(cut -d, -f$$(head -1 $(GPU_OUT)/work/runs/bench/head/metrics.csv | tr , '\n' | grep -nx events_per_s | cut -d: -f1) \
	         $(GPU_OUT)/work/runs/bench/head/metrics.csv | tail -n +2 | xargs printf '%.0f '); \
	    grep -o "compiled (.*\|not compiled.*" $(GPU_OUT)/compile-$$c.log | head -1 || true; \
	  done; \
	  for st in $$([ $$dev = cuda ] && echo yes no); do \
	    timeout 240 $(GPU_PY) -m hepreg train-head -c $(GPU_OUT)/work/bench.yaml --sweep $(GPU_OUT)/work/sweep.yaml \
	      --overwrite --set head_train.stack=$$st --set head_train.epochs=3 > $(GPU_OUT)/stack-$$st.log 2>&1 \
	      || { tail -5 $(GPU_OUT)/stack-$$st.log; exit 1; }; \
	    m=$$(ls -d $(GPU_OUT)/work/runs/bench/head/sweep/*/ | head -1)metrics.csv; \
	    echo "K=8 sweep from the cache, head_train.stack=$$st: events/s per epoch (x8 heads)" \
	      $$(cut -d, -f$$(head -1 $$m | tr , '\n' | grep -nx events_per_s | cut -d: -f1) $$m | tail -n +2 \
	         | xargs printf '%.0f '); \
	  done; \
	} 2>&1 | tee $(GPU_OUT)/gpu-check.txt

clean:
	rm -rf runs data
