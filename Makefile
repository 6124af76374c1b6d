# Two commands do all set-up on a bare machine (Python 3.11):
#   make demo   – create .venv, install HistoTx, run the pipeline end to end on a small synthetic cohort
#   make test   – create .venv, install HistoTx with test extras, run the whole test suite
#   make lint   – ruff check (pyflakes, bugbear, unused arguments, complexity, import order), ruff format --check,
#                 hadolint docker/Dockerfile
PYTHON ?= python3
VENV ?= .venv
TORCH = torch==2.14.1 torchvision==0.29.1
PIN = -c constraints.txt  # versions known to work together (see its header)
BIN = $(VENV)/bin

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) $(PIN)
	$(BIN)/pip install -q $(TORCH) $(PIN) -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(PIN) xformers
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/histotx demo out/demo

test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint docker/Dockerfile

.PHONY: install demo test lint
