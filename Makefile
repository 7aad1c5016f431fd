# Two commands set everything up: `make demo` and `make test` (each installs into .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pisa-installed
PYTEST_ARGS ?=

.PHONY: install lock lock-upgrade demo test test-fast lint bench gpu-check clean

# Byte-compiled once, here, with every core: where PYTHONDONTWRITEBYTECODE is set (many CI
# images and containers) Python never caches what it compiles on import, and every new
# process (each Ray worker, trial and test driver) compiled torch, Ray and MLflow again:
# 13.4 s -> 7.4 s to import the training stack on 2 cores. A few packages ship files that
# are not Python 3 (test data, templates): compileall's complaint about them is
# expected; it is counted and kept in .venv/compileall.log, not hidden.
SITE = $(VENV)/lib/python3*/site-packages
# A package index that drops connections (a 79 MB Ray wheel cut at 40 MB ended a CI run after
# pip's 5 resumes) costs a retry, not the run: more resumes and retries per download, and the
# whole install tried 3 times (pip's cache keeps the wheels already downloaded). As pip's
# environment variables: the recipe's arguments stay the Dockerfile's (tests/test_docker.py).
export PIP_RETRIES ?= 10
export PIP_RESUME_RETRIES ?= 30
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@for attempt in 1 2 3; do \
	  $(PY) -m pip install --quiet --no-compile -c constraints.txt -e ".[dev]" && break; \
	  test $$attempt = 3 && exit 1; \
	  echo "install: attempt $$attempt of 3 failed (see above); again in 30 s, with what was downloaded kept"; sleep 30; \
	done
	@echo "byte-compiling the installed packages (once)..."
	@$(PY) -m compileall -q -j 0 $(SITE) pisa > $(VENV)/compileall.log 2>&1 \
	  || echo "byte-compiling: $$(grep -c '^\*\*\* Error' $(VENV)/compileall.log) files are not Python 3 (expected: package test data); details in $(VENV)/compileall.log"
	@touch $(STAMP)

install: $(STAMP)

# The lock: constraints.txt pins every package the project installs (all extras, every
# platform), resolved by uv from pyproject.toml with torch/torchvision held at
# constraints-torch.txt's pair. pip installs from it (`-c constraints.txt` above): pip takes
# torch from its cache where uv would download it again (3 GB of CUDA wheels). uv lives in a
# venv of its own, not in .venv. `make lock` after a change to pyproject.toml keeps every pin
# that still fits; `make lock-upgrade` moves all of them (but torch's) to the newest releases.
LOCK_VENV  ?= .lock-venv
UV_VERSION ?= 0.13.9
UV_COMPILE  = $(LOCK_VENV)/bin/uv pip compile --quiet pyproject.toml --all-extras --universal \
	-c constraints-torch.txt -o constraints.txt --custom-compile-command "make lock"
$(LOCK_VENV)/bin/uv:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet uv==$(UV_VERSION)

lock: $(LOCK_VENV)/bin/uv
	$(UV_COMPILE)

lock-upgrade: $(LOCK_VENV)/bin/uv
	$(UV_COMPILE) --upgrade

# each demo is a new study (a name with a time stamp); `pisa study best quickstart-...` after
demo: $(STAMP)
	$(PY) -m pisa.cli study run studies/quickstart.yaml --set name=quickstart-$$(date +%Y%m%d-%H%M%S)

# lint, format, types and the layers first (seconds), then the suite on 2 workers: much of a
# test's time is waiting (processes and Ray starting, servers, checkpoints), which the other
# worker fills; a file runs whole on one worker (its module fixtures are built once)
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy pisa benchmarks
	$(VENV)/bin/lint-imports

test-fast: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_hlr.py
	$(PY) benchmarks/bench_step.py --device cpu --threads 1 --steps 6 --warmup 1

# on a GPU machine: every paper detector with AMP, a multi-GPU `pisa train` + resume (< 10 min)
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache
