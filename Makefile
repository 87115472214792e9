# Two set-up commands: `make install`, then `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=
DEMO_DIR ?= .demo

.PHONY: install proto test test-gpu fuzz run bench bench-cpu lint clean

install:
	@# The CPU build of torch from this machine's disk, unless some torch is already there (GPU machine).
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install "grpcio-tools==1.84.0"
	$(MAKE) proto
	$(PIP) install -e ".[dev]"

proto:
	$(PYTHON) proto/shard_server_build.py

test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# The fuzz suite of `make test` (1,500 derandomized examples) at length: 100,000 fresh random ones.
FUZZ_EXAMPLES ?= 100000
fuzz:
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_RANDOM=1 $(PYTHON) -m pytest tests/integration/test_fuzz.py -s -p no:cacheprovider \
		-o addopts="" --timeout 0 $(PYTEST_ARGS)

# On the GPU machine: the tests marked gpu (and nothing else needs a GPU).
test-gpu:
	$(PYTHON) -m pytest -m gpu -p no:cacheprovider $(PYTEST_ARGS)

run:
	$(PYTHON) -m shard_server.testing.demo --dir $(DEMO_DIR)

bench:
	$(PYTHON) -m bench.gpu

bench-cpu:
	$(PYTHON) -m bench.cpu

lint:
	$(PYTHON) -m ruff check shard_server model cache tests bench

clean:
	rm -rf shard_server/pb build *.egg-info .pytest_cache $(DEMO_DIR)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
