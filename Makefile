# clipzoo: `make demo` and `make test` work on a fresh machine (they install first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test,bench,serve,ray]' $(TORCH_PINS)
	touch $(STAMP)

demo: install
	$(BIN)/clipzoo demo --out demo-out

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo-out .pytest_cache
