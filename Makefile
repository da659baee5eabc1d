# `make demo` and `make test` set up ./.venv on first use (scripts/setup_env.sh) and again
# whenever the build inputs change.
VENV := .venv
PY := $(VENV)/bin/python
BUILD_INPUTS := pyproject.toml setup.py scripts/setup_env.sh $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test bench-cpu setup clean

demo: $(VENV)/.ready
	$(VENV)/bin/fastsat demo

test: $(VENV)/.ready
	$(PY) -m pytest -q

bench-cpu: $(VENV)/.ready
	$(PY) -m pytest bench/bench_ops_cpu.py --benchmark-only -q

setup: $(VENV)/.ready

$(VENV)/.ready: $(BUILD_INPUTS)
	bash scripts/setup_env.sh
	touch $@

clean:
	rm -rf $(VENV) build fastsat/_C*.so
