PYTHON ?= python

.PHONY: install train lint test test-fast clean clean-cache device-prepare device-check

# The one set-up command: the package (torch and torchvision pinned, the rest in ranges), plus Fashion-MNIST where apt
# can install it.
install:
	$(PYTHON) -m pip install -e ".[dev]"
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		[ -d /usr/share/datasets/fashion-mnist ] || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; \
	else \
		echo "Not root or no apt: see README 'Install': the idx files and paths.fashion_mnist_dir"; \
	fi

train:
	$(PYTHON) train.py

# format and lint (pyproject's [tool.ruff]); `ruff format . && ruff check --fix .` repairs most findings
lint:
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .

# two workers (most tests wait on one training subprocess at a time), the slowest tests listed at the end:
# CI is to stay well inside 20 minutes
test: lint
	$(PYTHON) -m pytest -q -n 2 --durations=15

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

# every run folder (checkpoints included) under logs/
clean:
	rm -rf logs .pytest_cache

# the embedded dataset's cached shards (one set per data setting, e.g. per data.noise); rebuilt when next needed
clean-cache:
	$(PYTHON) -m psdclip.tools.cache --clean

# every GPU code path as a short run, PASS/FAIL per check (docs/reference.md, "Device check"); device-prepare first, where PyPI
# is reachable (it fetches the wheels the GPU machine lacks)
device-prepare:
	bash bench/device_prepare.sh

device-check:
	bash bench/device_check.sh
