# The README's two commands: `make demo` and `make test`. Both install everything first:
# the core, the `worker` extra (torch), the `demo` extra (the tests use it too) and `dev`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned to what the reference machine ships on disk (a CUDA build that also
# runs on the CPU). Override for another platform, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PORT ?= 8000
PYTEST_ARGS ?=

BENCHMARKS := auth_overhead ingest_memory hostile_uploads strategy_cost epoch_overhead budget_quality gpu_path quality explain_latency label_issues onnx_export predict_latency api_load start_latency lp_ft_first_epoch budget_wall

.PHONY: install demo serve test lint bench bench-smoke clean

install: $(VENV)/.installed

# The dashboard test (tests/e2e/test_dashboard.py) drives Debian's chromium through
# playwright (the `dev` extra); no browser is downloaded. benchmarks/api_load.py drives
# Debian's wrk. Both installed when missing, as root.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[worker,demo,dev]'
	command -v chromium >/dev/null || if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; \
	else echo "chromium is missing: the dashboard test needs Debian's chromium (as root: apt-get install chromium)"; fi
	command -v wrk >/dev/null || if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk; \
	else echo "wrk is missing: benchmarks/api_load.py needs Debian's wrk (as root: apt-get install wrk)"; fi
	touch $@

demo: install
	$(BIN)/finetune demo --port $(PORT)

serve: install
	$(BIN)/finetune serve --port $(PORT)

# The whole suite: every benchmark at its --smoke size (they must keep running), then every
# test tier in TEST_PROCESSES pytest processes (pytest-xdist, a test file per process at a
# time; each process has its own database, bucket, queues and workers: tests/conftest.py).
# A subset (PYTEST_ARGS=...) skips the benchmarks and runs in one process.
TEST_PROCESSES ?= 2
test: install
	bash .ci/services
	$(if $(PYTEST_ARGS),,$(MAKE) --no-print-directory bench-smoke)
	$(BIN)/python -m pytest $(or $(PYTEST_ARGS),-n $(TEST_PROCESSES) --dist loadfile)

bench-smoke: install
	@mkdir -p var
	@for b in $(BENCHMARKS); do \
		echo "== benchmarks/$$b.py --smoke"; start=$$(date +%s); \
		$(BIN)/python benchmarks/$$b.py --smoke > var/bench-smoke-$$b.log 2>&1 \
			|| { tail -n 40 var/bench-smoke-$$b.log; exit 1; }; \
		tail -n 3 var/bench-smoke-$$b.log; \
		echo "   ($$(( $$(date +%s) - start )) s)"; \
	done

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy core service worker cli

bench: install
	$(BIN)/python benchmarks/epoch_overhead.py

clean:
	rm -rf var .pytest_cache
