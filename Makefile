# The README's commands. Each target does its own setup on a fresh machine:
#   make run    the main job on the built-in default data
#   make test   the whole test suite (+ every benchmark once, untimed)
# Other targets: make bench (timed benchmarks -> out/bench.json, out/bench.md),
# make cmake-check (the libtorch CMake build), make wheel-check (wheel into a fresh venv).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.14.1
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
SOURCES     := $(wildcard setup.py csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)
STAMP_VENV  := $(VENV)/.deps-stamp
STAMP_EXT   := build/.ext-stamp

export MAX_JOBS ?= 2

.PHONY: setup install run test bench cmake-check wheel-check consumers-check clean

setup: $(STAMP_EXT)

$(STAMP_VENV): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements-dev.txt
	touch $@

# Rebuilt only when a C++/CUDA source or setup.py changes.
$(STAMP_EXT): $(STAMP_VENV) $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

install: setup

run: setup
	$(VENV)/bin/chameleon run

test: setup
	$(PY) -m pytest python_tests benchmarks --benchmark-disable -p no:cacheprovider

bench: setup
	mkdir -p out
	$(PY) -m pytest benchmarks --benchmark-json=out/bench.json --benchmark-min-rounds=5 -p no:cacheprovider -q
	$(PY) benchmarks/summarize.py out/bench.json | tee out/bench.md

cmake-check: setup
	bash .ci/cmake_check.sh $(PY)

wheel-check: setup
	bash .ci/wheel_check.sh $(PY) "$(TORCH_SPEC)"

# Before each release (too slow for CI's budget on a cold cache): every export loaded by each
# trainer's own code, one venv per consumer under ~/.cache/chameleon_ext/consumers.
consumers-check: setup
	CHAMELEON_PYTHON=$(PY) bash benchmarks/consumers/check.sh

clean:
	rm -rf build dist *.egg-info chameleon_ext/_C*.so cmake-build out
