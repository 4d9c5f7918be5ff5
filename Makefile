# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# requirements the first time (and again whenever a requirements file changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint clean chromium

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m data.synthetic --out demo_data
	$(PY) train_retrieval.py --config configs/demo.yaml --output-dir demo_output

test: $(VENV)/.installed chromium
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

# The search page's browser test drives Debian's Chromium (tests/test_search_server.py); install it when missing.
# Without apt or root the install fails and that one test is skipped with its reason (CI runs as root).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update && apt-get install -y chromium) || \
		echo "warning: could not install chromium (needs apt and root); the browser test will be skipped"

clean:
	rm -rf demo_data demo_output demo_index* .pytest_cache .ruff_cache
