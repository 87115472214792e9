# Two set-up commands: `make install`, then `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=
# make run keeps the demo model in the user cache (~/.cache/lorax-mistral-shard) unless DEMO_DIR is set.
DEMO_DIR ?=

.PHONY: install proto test test-fast test-gpu fuzz fuzz-speculative run bench bench-cpu lint clean

install:
	@# The CPU build of torch from this machine's disk, unless some torch is already there (GPU machine).
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install "grpcio-tools==1.84.0"
	@# Triton for the kernel tests in its CPU interpreter: the GPU machine's version, where a wheel exists
	@# (Linux x86_64/aarch64), unless some triton is already there (a CUDA torch brings its own).
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) install "triton==3.6.0" || \
		echo "no triton wheel for this platform: tests/unit/test_kernels_interpret.py will skip"
	$(MAKE) proto
	$(PIP) install -e ".[dev]"

proto:
	$(PYTHON) proto/shard_server_build.py

test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# The fuzz suite of `make test` (1,000 derandomized examples) at length: 100,000 fresh random ones.
FUZZ_EXAMPLES ?= 100000
fuzz:
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_RANDOM=1 $(PYTHON) -m pytest tests/integration/test_fuzz.py -s -p no:cacheprovider \
		-o addopts="" --timeout 0 $(PYTEST_ARGS)

# The same against a speculative shard whose steps run ahead of the host (--speculative-tokens 3 --overlap).
fuzz-speculative:
	FUZZ_SPECULATIVE=3 $(MAKE) fuzz

# The inner loop (under 2 minutes on 2 cores): unit and model tests without those marked slow.
test-fast:
	$(PYTHON) -m pytest tests/unit tests/model -m "not slow and not integration and not gpu" $(PYTEST_ARGS)

# On the GPU machine: the tests marked gpu (and nothing else needs a GPU).
test-gpu:
	$(PYTHON) -m pytest -m gpu -p no:cacheprovider $(PYTEST_ARGS)

run:
	$(PYTHON) -m shard_server.testing.demo $(if $(DEMO_DIR),--dir $(DEMO_DIR))

bench:
	$(PYTHON) -m bench.gpu

bench-cpu:
	$(PYTHON) -m bench.cpu

lint:
	$(PYTHON) -m ruff check shard_server model cache tests bench

clean:
	rm -rf shard_server/pb build *.egg-info .pytest_cache .demo
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
