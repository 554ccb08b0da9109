# deepserve: one venv in .venv, built from nothing by any target that needs it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REPO ?= models
# torch is installed on its own first, pinned: a bare range could pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install browser test models serve lint proto bench bench-generate soak fuzz clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[train,test]'
	$(PY) -m pip check
	touch $@

install: $(STAMP)

# The console's browser tests drive Debian's chromium through playwright (which never downloads a browser here).
browser:
	@[ -x /usr/bin/chromium ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(BIN)/pytest -q -ra

models: install
	$(BIN)/deepserve train all --repository $(REPO)

# Train the examples only when the repository has no model yet, then serve it.
serve: install
	@if ! ls $(REPO)/*/config.pbtxt >/dev/null 2>&1; then $(MAKE) models; fi
	$(BIN)/deepserve serve --repository $(REPO)

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile Dockerfile.gpu

proto: install
	$(PY) proto/generate.py

bench: install
	$(BIN)/deepserve bench --repository $(REPO) --readme README.md

# Generated tokens/s at 1, 8 and 32 concurrent generations: server, in-process ceiling, one at a time (~2 minutes).
bench-generate: install
	$(PY) -m bench.generation --readme README.md

# Long forms of tests that CI runs short: 10 minutes at concurrency 64 over the example models; 100k fuzz cases
# over gRPC, 70k over HTTP.
# -o timeout: pytest's own 600 s limit (pyproject) would end a 600 s soak before it reports.
soak: install
	@if ! ls $(REPO)/*/config.pbtxt >/dev/null 2>&1; then $(MAKE) models; fi
	$(BIN)/pytest -q -s -o timeout=1200 tests/test_soak.py --soak-seconds 600 --soak-repository $(REPO)

# -o timeout=0: the long forms run past pytest's own 600 s limit (pyproject). Schemathesis takes ~0.3 s a case here,
# so 2,000 HTTP cases are ~10 minutes.
fuzz: install
	FUZZ_EXAMPLES=50000 FUZZ_MUTATIONS=50000 $(BIN)/pytest -q -o timeout=0 tests/test_fuzz.py
	HTTP_FUZZ_CASES=2000 HTTP_FUZZ_MUTATIONS=50000 $(BIN)/pytest -q -o timeout=0 tests/test_http_fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info
