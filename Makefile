# Set-up and the project's two main commands. `make study` and `make test` work on a fresh machine
# with python3: the virtual environment is created on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this machine's disk; the package itself only asks torch>=2.6.
TORCH_PIN ?= torch==2.13.0
# Extra arguments, e.g. `make study STUDY_ARGS="--schemes rope,alibi"`, `make test PYTEST_ARGS=-x`.
STUDY_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup study test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)" || \
	  $(BIN)/python -m pip install --quiet "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

study: $(VENV)/.installed
	$(BIN)/posemb study $(STUDY_ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(BIN)/posemb demo

bench: $(VENV)/.installed
	$(BIN)/posemb bench

clean:
	rm -rf $(VENV) *.egg-info
