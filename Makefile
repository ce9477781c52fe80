# The two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= builds/demo

.PHONY: venv demo test docs bench clean device-wheels device-check device-rehearsal

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The SePP-ID loop on Fashion-MNIST (spp-curate demo). Fashion-MNIST comes from
# the Debian package when it can be installed here,
# else from the Hub copy; the build says how to get it when neither works.
demo: $(STAMP)
	@if [ ! -d $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make demo: installing Fashion-MNIST (Debian package dataset-fashion-mnist; waits up to 2 min for another apt run)"; \
		if ! (apt-get install -y -qq -o DPkg::Lock::Timeout=120 dataset-fashion-mnist || \
		      (apt-get update -qq -o DPkg::Lock::Timeout=120 && apt-get install -y -qq -o DPkg::Lock::Timeout=120 dataset-fashion-mnist)) \
		      > $(VENV)/apt-fashion-mnist.log 2>&1; then \
			echo "make demo: apt-get could not install it ($(VENV)/apt-fashion-mnist.log ends:)"; tail -n 3 $(VENV)/apt-fashion-mnist.log; \
			echo "make demo: the build tries the Hub copy next"; \
		fi; \
	fi
	$(BIN)/spp-curate demo --out $(DEMO_OUT)

# One worker per core this process may run on (at most 4; pytest-xdist's "auto" may count a container's
# host), each test file on one worker so that its fixtures are built once, heaviest files first (the order
# tests/conftest.py gives; xdist's own reorder, by number of tests, would start the heaviest last).
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The documentation site (MkDocs Material) from docs/ into site/; --strict fails on a broken link.
docs: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python bench/mine.py --quick
	$(BIN)/python bench/embed.py --quick
	$(BIN)/python bench/trainer.py --quick
	$(BIN)/python bench/learning_gain.py --quick

# The GPU check (bench/device_check.py). device-wheels runs where the package index is reachable and fills
# device-wheels/ (git-ignored) with what a bare CUDA image lacks; device-check runs on the GPU machine.
device-wheels: $(STAMP)
	cd bench && ../$(BIN)/python device_wheels.py --dest ../device-wheels

device-check:
	python3 bench/device_check.py --out device-check

device-rehearsal: $(STAMP)
	$(BIN)/python bench/device_check.py --cpu --out builds/device-rehearsal

clean:
	rm -rf builds .pytest_cache
