# trainscope: `make demo` runs the main job, `make test` builds and runs every test.
# Both set up what they need on a fresh machine (.venv from PyPI, CMake configure and build)
# and reuse it when already set up. `make test-cpu-only` builds and tests a CPU-only build beside it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(BUILD)/.installed
# The CUDA kernels of build/ (CMake option TRAINSCOPE_CUDA): AUTO builds them when a CUDA compiler
# and a torch with CUDA are found, ON requires them, OFF leaves them out.
TRAINSCOPE_CUDA ?= AUTO
# What the compiled part depends on; Python sources are used in place (editable install).
NATIVE_SOURCES := $(shell find cuda src include tests/cpp bench cmake examples -type f \( -name '*.cu' -o -name '*.h' -o -name '*.cpp' -o -name '*.cuh' -o -name '*.txt' -o -name '*.in' -o -name '*.cmake' \) 2>/dev/null) \
                  CMakeLists.txt pyproject.toml

export PATH := $(CURDIR)/$(VENV)/bin:/usr/local/cuda/bin:$(PATH)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: all build wheel test test-cpp test-python test-cpu-only demo clean googletest-sources peer-wheels

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

# GoogleTest's sources in a git-ignored folder, for a machine without the package (the GPU check
# carries them along: bench/README.md). tests/CMakeLists.txt builds them when no package is found.
GTEST_SOURCES := third_party/googletest
googletest-sources: $(GTEST_SOURCES)/CMakeLists.txt
$(GTEST_SOURCES)/CMakeLists.txt:
	@if [ ! -f /usr/src/googletest/CMakeLists.txt ]; then \
	  echo "installing googletest (Debian's GoogleTest sources)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq googletest; \
	fi
	@mkdir -p $(GTEST_SOURCES)
	cp -a /usr/src/googletest/. $(GTEST_SOURCES)/

# Wheels of the benchmarks' peers that a GPU machine's image lacks (pure Python; the rest of what
# they import, scipy, pandas, matplotlib and seaborn, is there), for the GPU check to install
# offline (bench/README.md). Versions from bench/requirements-peers.txt.
PEERS_FOR_GPU_CHECK := backpack-for-pytorch einops unfoldNd cockpit-for-pytorch json-tricks setuptools opacus
peer-wheels: $(DEPS_STAMP)
	@mkdir -p .whl
	@for p in $(PEERS_FOR_GPU_CHECK); do \
	  req=$$(grep -i "^$$p==" bench/requirements-peers.txt) || { echo "$$p is not in bench/requirements-peers.txt"; exit 1; }; \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl "$$req" || exit 1; \
	done
	@ls .whl

# scikit-build-core configures and builds the whole CMake project (libraries, op library,
# tests, benchmarks, examples) in build/ and installs the package editable into the venv.
$(BUILD_STAMP): $(DEPS_STAMP) $(BUILD)/.gtest-checked $(NATIVE_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . -Cbuild-dir=$(BUILD) \
	  -Ccmake.define.TRAINSCOPE_TORCH_PYTHON=$(CURDIR)/$(PY) -Ccmake.define.TRAINSCOPE_CUDA=$(TRAINSCOPE_CUDA) \
	  -Ccmake.define.TRAINSCOPE_BUILD_TESTS=ON -Ccmake.define.TRAINSCOPE_BUILD_BENCH=ON \
	  -Ccmake.define.TRAINSCOPE_BUILD_EXAMPLES=ON -Ccmake.define.TRAINSCOPE_RELOCATABLE=OFF
	@touch $@

build: $(BUILD_STAMP)

# The wheel a user gets from `pip install .`: pip's default build isolation, the two libraries
# only (build/wheel keeps its build tree, so a rebuild is incremental). tests/python/test_wheel.py
# installs it into a fresh environment.
WHEEL_STAMP := dist/.built
PY_SOURCES := $(shell find python_bindings -name '*.py' 2>/dev/null)
$(WHEEL_STAMP): $(DEPS_STAMP) $(NATIVE_SOURCES) $(PY_SOURCES)
	@rm -f dist/trainscope-*.whl
	$(PY) -m pip wheel -q --no-deps -w dist . -Cbuild-dir=$(BUILD)/wheel
	@touch $@

wheel: $(WHEEL_STAMP)

test-cpp: build
	cd $(BUILD) && ctest --output-on-failure -j $(shell nproc)

test-python: build
	$(PY) -m pytest tests/python -q -rs

# The peers the comparison tests check against (Cockpit, BackPACK, Opacus: never dependencies of
# trainscope), installed for `make test` without dependency resolution (see the file for why).
PEERS_STAMP := $(VENV)/.peers-installed
$(PEERS_STAMP): $(DEPS_STAMP) bench/requirements-peers.txt
	$(PY) -m pip install -q --no-deps -r bench/requirements-peers.txt
	@touch $@

test: build wheel $(PEERS_STAMP)
	@status=0; \
	( cd $(BUILD) && ctest --output-on-failure -j $(shell nproc) ) || status=1; \
	$(PY) -m pytest tests/python -q -rs --durations=10 || status=1; \
	exit $$status

# A CPU-only build in build/cpu-only, configured as on a machine without the CUDA Toolkit: AUTO,
# with no CUDA compiler to find. CMake finds nvcc on PATH (here also as /usr/local/bin/nvcc), so
# CUDACXX points nowhere to hide it; the torch is the venv's, built with CUDA. Then its ctest, and
# the Python tests against its op library: -S and PYTHONPATH take the package's sources from
# python_bindings/ instead of the editable install of build/. test_gpu_check.py is left out: it
# checks the GPU check of build/, which `make test` runs.
CPU_ONLY_BUILD := $(BUILD)/cpu-only

test-cpu-only: $(DEPS_STAMP) $(BUILD)/.gtest-checked
	CUDACXX=/nonexistent/nvcc cmake -S . -B $(CPU_ONLY_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DTRAINSCOPE_TORCH_PYTHON=$(CURDIR)/$(PY)
	@grep -qx 'TRAINSCOPE_WITH_CUDA:INTERNAL=OFF' $(CPU_ONLY_BUILD)/CMakeCache.txt || \
	  { echo "test-cpu-only: CMake configured $(CPU_ONLY_BUILD) with CUDA"; exit 1; }
	cmake --build $(CPU_ONLY_BUILD)
	@status=0; \
	( cd $(CPU_ONLY_BUILD) && ctest --output-on-failure -j $(shell nproc) ) || status=1; \
	TRAINSCOPE_OPS_LIBRARY=$(CURDIR)/$(CPU_ONLY_BUILD)/libtrainscope_ops.so \
	PYTHONPATH=$(CURDIR)/python_bindings:$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
	  $(PY) -S -m pytest tests/python -q -rs --ignore=tests/python/test_gpu_check.py --ignore=tests/python/test_wheel.py || status=1; \
	exit $$status

demo: build
	$(PY) -m trainscope.demo $(DEMO_ARGS)

clean:
	rm -rf $(BUILD) dist
