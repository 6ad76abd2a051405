# trainscope: `make demo` runs the main job, `make test` builds and runs every test.
# Both set up what they need on a fresh machine (.venv from PyPI, CMake configure and build)
# and reuse it when already set up.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(BUILD)/.installed
# What the compiled part depends on; Python sources are used in place (editable install).
NATIVE_SOURCES := $(shell find cuda src include tests/cpp bench cmake examples -type f \( -name '*.cu' -o -name '*.h' -o -name '*.cpp' -o -name '*.cuh' -o -name '*.txt' -o -name '*.in' \) 2>/dev/null) \
                  CMakeLists.txt pyproject.toml

export PATH := $(CURDIR)/$(VENV)/bin:/usr/local/cuda/bin:$(PATH)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: all build test test-cpp test-python demo clean

all: build

$(DEPS_STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

# GoogleTest comes from Debian's package; install it when missing (needs root, as on CI).
$(BUILD)/.gtest-checked:
	@mkdir -p $(BUILD)
	@if [ ! -f /usr/include/gtest/gtest.h ]; then \
	  echo "installing libgtest-dev"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev; \
	fi
	@touch $@

# scikit-build-core configures and builds the whole CMake project (libraries, op library,
# tests, benchmarks) in build/ and installs the package editable into the venv.
$(BUILD_STAMP): $(DEPS_STAMP) $(BUILD)/.gtest-checked $(NATIVE_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . \
	  -Ccmake.define.Python_EXECUTABLE=$(CURDIR)/$(PY)
	@touch $@

build: $(BUILD_STAMP)

test-cpp: build
	cd $(BUILD) && ctest --output-on-failure -j $(shell nproc)

test-python: build
	$(PY) -m pytest tests/python -q -rs

test: build
	@status=0; \
	( cd $(BUILD) && ctest --output-on-failure -j $(shell nproc) ) || status=1; \
	$(PY) -m pytest tests/python -q -rs || status=1; \
	exit $$status

demo: build
	$(PY) -m trainscope.demo $(DEMO_ARGS)

clean:
	rm -rf $(BUILD)
