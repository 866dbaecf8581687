# mvkit: two set-up commands, `make demo` and `make test`, both from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := demo

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

# torch first, pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch would
# pull a multi-GB CUDA build. pyproject.toml keeps an open range for GPU users.
# The optional `ray` extra (mvprep build --runner ray) and `parquet` extra (Parquet and
# save_to_disk input) and `fastjpeg` extra (simplejpeg: the faster JPEG decode, see
# mvprep.imaging) and `s3` extra (s3fs: s3:// shards, tested against moto's S3 server) are
# installed here so that `make test` runs their tests; a plain
# `pip install mvkit` stays without them.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,train,ray,parquet,fastjpeg,s3]'
	touch $(STAMP)

demo: install
	$(PY) scripts/make_demo_data.py $(DEMO)/data --seed 0
	$(VENV)/bin/mvprep build $(DEMO)/data/demo.json --out $(DEMO)/shards --max-res 1344 \
		--workers 2 --samples-per-shard 16
	$(VENV)/bin/mvprep build $(DEMO)/data/demo_cookbook.jsonl --out $(DEMO)/cookbook \
		--max-res 1344 --workers 2
	$(VENV)/bin/mvprep verify $(DEMO)/shards
	$(VENV)/bin/mvprep verify $(DEMO)/cookbook
	rm -rf $(DEMO)/run
	OMP_NUM_THREADS=1 $(VENV)/bin/mvtrain run --shards $(DEMO)/shards --shards $(DEMO)/cookbook:2 \
		--model tiny --output $(DEMO)/run --max-steps 4 --lr 1e-3 --token-budget 4096 \
		--patch-budget 16384 --batch-log $(DEMO)/run/batches.jsonl --nproc-per-node 2

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q -p no:cacheprovider -n 2

# The edit loop: everything but the tests marked `slow` (subprocess CLIs, torchrun, DeepSpeed,
# Ray, scripts/gpu_check.py, real pipeline builds, anything over ~2 s), in under a minute on
# 2 cores. One process: collecting (importing torch, transformers, hypothesis) costs ~13 s and
# the tests themselves ~20 s, and `-n 2` collects once per worker (48 s against 39 s here).
# A module that fails to import is reported and the rest still run, as under `-n`. No lint,
# for speed: `make lint`. `make test` still runs every test.
test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" --continue-on-collection-errors

clean:
	rm -rf $(DEMO) .pytest_cache .hypothesis
