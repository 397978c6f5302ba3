# Every target runs inside a local virtual environment that it creates on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs

.PHONY: venv install test test-all demo demo-classifier demo-mae clean

venv: $(BIN)/.installed

# torch is installed first, pinned, so nothing later can pull a CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[train,export,serve,dev,reference]"
	touch $@

install: venv

# pytest exits 5 when it collects no test: that is not a failure of the project.
test: venv
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# Also the longer checks (multi-process DDP, demo-sized training).
test-all: venv
	$(BIN)/python -m pytest -q --runslow; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

demo: demo-classifier demo-mae

demo-classifier: venv
	$(BIN)/vit-train classifier --out $(RUNS)/demo-classifier

demo-mae: venv
	$(BIN)/vit-train mae --out $(RUNS)/demo-mae

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache
