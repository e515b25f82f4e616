# nxserve developer entry points. Only Python 3.11, make and pip are needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CACHE  := .cache
DEFAULT_MODEL := $(CACHE)/models/tiny-llama

.PHONY: setup test lint run model clean proto-lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e '.[test]'
	$(PY) -c 'import sys; from nxcore import native; sys.exit(native.main())'  # builds nxcore's C++ ops once
	touch $(STAMP)

$(DEFAULT_MODEL)/config.json: | $(STAMP)
	$(VENV)/bin/nxserve make-model --arch llama --preset tiny --out $(DEFAULT_MODEL)

model: $(DEFAULT_MODEL)/config.json

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (lint and format, settings in pyproject.toml) and mypy over the packages; CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Starts a local cluster (1 prefill + 2 decode processes) on the default model, streams a few
# requests through the public gRPC API, prints them with TTFT and tokens/s, and stops the cluster.
# RUN_ARGS=--keep-running keeps it serving afterwards.
run: $(STAMP) $(DEFAULT_MODEL)/config.json
	$(VENV)/bin/nxserve demo --model $(DEFAULT_MODEL) $(RUN_ARGS)

clean:
	rm -rf $(VENV) $(CACHE) *.egg-info

# buf lint (STANDARD, buf.yaml) over protos/; needs npm. The Node tools of the tests (tests/node.py,
# same versions) go into .cache/node once.
NODE_TOOLS := @bufbuild/buf@1.75.0 @grpc/grpc-js@1.14.7 @grpc/proto-loader@0.8.1
proto-lint:
	test -x $(CACHE)/node/node_modules/.bin/buf || npm install --prefix $(CACHE)/node --no-audit --no-fund --no-save $(NODE_TOOLS) >/dev/null
	$(CACHE)/node/node_modules/.bin/buf lint
