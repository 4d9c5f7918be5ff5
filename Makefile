# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# requirements the first time (and again whenever a requirements file changes). `make test-min` runs the tests
# again with the oldest versions requirements.txt allows (requirements-min.txt, in .venv-min); CI runs both.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_MIN ?= .venv-min
PY_MIN := $(VENV_MIN)/bin/python

.PHONY: demo test test-min lint clean chromium

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

# The lowest versions of transformers, timm, peft and open_clip_torch (requirements-min.txt) with the torch and
# torchvision of .venv: pinning those two to the main environment's versions lets pip take them from its cache
# instead of resolving (and downloading) another torch release.
$(VENV_MIN)/.installed: requirements.txt requirements-dev.txt requirements-min.txt $(VENV)/.installed
	$(PYTHON) -m venv $(VENV_MIN)
	$(PY) -m pip list --format=freeze | grep -E '^(torch|torchvision)==' > $(VENV_MIN)/torch-of-main-venv.txt
	$(PY_MIN) -m pip install -c $(VENV_MIN)/torch-of-main-venv.txt -r requirements-min.txt
	touch $@

test-min: $(VENV_MIN)/.installed
	$(PY_MIN) -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|transformers|timm|peft|open.clip.torch) '
	$(PY_MIN) -m pytest

# The search page's browser test drives Debian's Chromium (tests/test_search_server.py); install it when missing.
# Without apt or root the install fails and that one test is skipped with its reason (CI runs as root).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update && apt-get install -y chromium) || \
		echo "warning: could not install chromium (needs apt and root); the browser test will be skipped"

clean:
	rm -rf demo_data demo_output demo_index* .pytest_cache .ruff_cache
