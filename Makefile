# capray: the two front-door commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

bench: $(STAMP)
	$(PY) bench/caption_throughput.py --json bench-output/caption_throughput.json
	$(PY) bench/prepare_throughput.py
	$(PY) bench/train_scaling.py
	$(PY) bench/listing_memory.py --json bench-output/listing_memory.json

clean:
	rm -rf $(VENV) demo-output bench-output
