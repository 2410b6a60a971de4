# All set-up lives here: `make test` and `make quickstart` create .venv and install into it
# (idempotent: the install step reruns only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test quickstart lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

quickstart: $(STAMP)
	$(BIN)/clerf preview --generator procedural --n 16 --out runs/quickstart/preview.png

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
