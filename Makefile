# The two commands: `make report` (run every notebook, render HTML reports) and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; override for a CUDA machine, e.g. TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.kvlab-installed

.PHONY: install test report lab demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

report: $(STAMP)
	$(BIN)/python -m kvlab.report $(if $(PARAMS),$(PARAMS))

demo: $(STAMP)
	$(BIN)/python -m kvlab.demo

# JupyterLab is installed once, on top of the rest (again only when pyproject.toml changes).
LAB_STAMP := $(VENV)/.kvlab-lab-installed

$(LAB_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[lab]"
	touch $@

lab: $(LAB_STAMP)
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf reports data/checkpoints
