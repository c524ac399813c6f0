# Set-up, build, demo and tests. Every target is idempotent: a second run only redoes what changed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BUILD_DIR = build/dev-cuda-$(VIDFAST_CUDA)
VIDFAST_CUDA ?= AUTO
VIDFAST_CUDA_ARCHS ?= 8.0;9.0a
APT_PACKAGES := pkg-config ffmpeg libavformat-dev libavcodec-dev libavutil-dev libswscale-dev libffmpeg-nvenc-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test build system venv samples bench clean sanitize fuzz memory

demo: build samples
	$(PY) -m pyvidfast demo

test: build samples
	$(PY) -m pytest tests

system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

# The venv's path file puts this checkout on sys.path, so `.venv/bin/python -c "import pyvidfast"` works from any
# folder (the library is built in place, into pyvidfast/). Rewritten only when the checkout has moved.
venv: $(VENV)/.requirements.stamp
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	[ "$$(cat $$site/pyvidfast-checkout.pth 2>/dev/null)" = "$(CURDIR)" ] || echo "$(CURDIR)" > $$site/pyvidfast-checkout.pth

$(VENV)/.requirements.stamp: requirements.txt
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Development build: CMake + Ninja write pyvidfast/_C.so into the source tree; Ninja recompiles only what changed.
build: system venv
	@start=$$(date +%s); \
	if [ ! -f $(BUILD_DIR)/build.ninja ]; then \
	  $(VENV)/bin/cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	    -DPython_EXECUTABLE=$(abspath $(PY)) -DVIDFAST_INPLACE=ON \
	    -DVIDFAST_CUDA=$(VIDFAST_CUDA) "-DVIDFAST_CUDA_ARCHS=$(VIDFAST_CUDA_ARCHS)" || exit 1; \
	fi; \
	$(VENV)/bin/cmake --build $(BUILD_DIR) || exit 1; \
	echo "build: $$(( $$(date +%s) - start )) s"

# Needs no build: `import pyvidfast` loads the compiled library only when there is one.
samples: venv
	$(PY) -m pyvidfast samples

# Every CPU benchmark, then the doc tables from their JSON (bench/results/*.json).
bench: build samples
	for b in bench/*.py; do m=$$(basename $$b .py); case $$m in common*|*_gpu|report|__init__) ;; *) $(PY) -m bench.$$m || exit 1;; esac; done
	$(PY) -m bench.report

# The library with ASan + UBSan (+ LeakSanitizer) in build/sanitize, and the reader and op tests against it
# (sanitize/run.sh; docs/reliability.md). SANITIZE_TESTS="tests/x.py ..." picks other tests.
SANITIZE_TESTS ?=
sanitize: system venv samples
	sanitize/run.sh $(SANITIZE_TESTS)

# libFuzzer on the reader's C++ core for SECONDS seconds (installs Debian's clang where missing; fuzz/run.sh).
SECONDS ?= 600
fuzz: system venv
	fuzz/run.sh $(SECONDS)

# The ops' RSS check at 10,000 calls of every case (the suite makes 1,000 of the slow ones), each growth printed.
memory: build
	VIDFAST_MEMORY_CALLS=10000 $(PY) -m pytest tests/test_ops_memory.py -q -s

clean:
	rm -rf build pyvidfast/_C*.so
