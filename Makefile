# capray: the two front-door commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers for make test / test-fast (0: one process). On a 2-core machine the suite is
# CPU-bound: two workers took 1,103 s against ~1,180 s for one (docs/testing.md), not worth the noise.
TEST_WORKERS ?= 0

.PHONY: install demo test test-fast test-extended test-all bench million bundle gpu-check clean

install: $(STAMP)

# torch/torchvision first, pinned: the versions these machines hold locally (and the newest the
# pip cap admits). Everything else comes from pyproject.toml.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import capray, torch, torchvision, ray, moto, pycocoevalcap, efficientnet_lite_pytorch"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/capray demo --out demo-output

# make test: every test of the product. The harness's own tests and the bundle build (marker
# "extended") run in make test-all, and in CI when tools/ or tests/fakecluster.py changed (.ci/run).
test: $(STAMP)
	@command -v chromium >/dev/null || echo "make test: no chromium on PATH, so the gallery's browser test is skipped (apt-get install chromium; .ci/run does)"
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup --durations=25 -m "not extended" tests

# The inner loop: no Ray, no fake cluster, no subprocess pipeline (about 80 s here).
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) -m "not ray and not slow and not extended" tests

test-extended: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 -m extended tests
	git rev-parse HEAD:tools HEAD:tests/fakecluster.py > .ci/extended-tested

# Everything; records the harness and tools trees it passed with in .ci/extended-tested (commit it).
test-all: test test-extended

bench: $(STAMP)
	$(PY) bench/caption_throughput.py --json bench-output/caption_throughput.json
	$(PY) bench/prepare_throughput.py
	$(PY) bench/train_scaling.py
	$(PY) bench/listing_memory.py --json bench-output/listing_memory.json
	$(PY) bench/shard_input.py --json bench-output/shard_input.json

# A million images through caption, killed half way and resumed (most of an hour or more; not in make bench).
million: $(STAMP)
	$(PY) bench/million.py --loose --prepare-samples 100000 --json bench-output/million.json

# What an air-gapped GPU node (Python 3.12, its own torch stack, no Ray, no index) needs to run capray:
# dist/capray-bundle-py312-manylinux2014_x86_64/, carried with the call; install.sh there installs it.
bundle: $(STAMP)
	$(PY) tools/bundle.py

# The GPU path measured on one node (bench/gpu_check.py); without a GPU it runs at small sizes and says so.
# On an air-gapped node, after the bundle's install.sh: make gpu-check PY=python3 (no .venv is made then).
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
	$(PY) bench/gpu_check.py --json bench-output/gpu_check.json

clean:
	rm -rf $(VENV) demo-output bench-output dist
