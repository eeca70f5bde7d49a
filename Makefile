# Two commands on a fresh machine (Python 3.11 and make): `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean bench-accounting bench-compare bench-hf bench-memory bench-checkpointing bench-profile bench-ddp bench-audit

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: an unpinned torch (or opacus pulling one) downloads GBs of CUDA.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,examples]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

# Two worker processes (pytest-xdist), then the tests that measure this process's memory alone.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not serial"
	$(BIN)/python -m pytest -m serial

# Benchmarks are not tests: minutes, machine-dependent, run on demand.
bench-accounting: $(STAMP)
	$(BIN)/python benchmarks/accounting_bench.py

bench-compare: $(STAMP)
	$(BIN)/python benchmarks/compare_bench.py

# Hugging Face models (issue 14): CPU time and memory vs non-private and Opacus; the
# "Hugging Face models" section of docs/comparison.md (about 15 minutes on 2 cores).
bench-hf: $(STAMP)
	$(BIN)/python -m benchmarks.hf_bench

# Memory (issue 15): peak memory and time of dpclip ("auto" and "low") vs non-private and
# Opacus ghost+BMM over sequence lengths and widths; the "Memory" section of docs/comparison.md.
bench-memory: $(STAMP)
	$(BIN)/python -m benchmarks.memory_bench

bench-checkpointing: $(STAMP)
	$(BIN)/python -m benchmarks.checkpointing_bench

# Several processes (issue 16): 1 vs 2 gloo processes, time per logical step and the
# all-reduce's share; the "Measured" section of docs/distributed.md (about 2 minutes).
bench-ddp: $(STAMP)
	$(BIN)/python -m benchmarks.ddp_bench

# Canary audit (issue 18): cost and power of `dpclip audit` on the built-in MLP over
# canaries and steps, with the counted-twice control; the table of docs/audit.md (about 5 minutes).
bench-audit: $(STAMP)
	$(BIN)/python -m benchmarks.audit_bench

# Per-phase time of a dpclip step next to non-private training (MODEL=, B=, CLIPPING=, DEVICE=).
bench-profile: $(STAMP)
	$(BIN)/python benchmarks/phase_profile.py --model $(or $(MODEL),transformer) \
		--micro-batch $(or $(B),32) --clipping $(or $(CLIPPING),auto) --device $(or $(DEVICE),cpu)

clean:
	rm -rf $(VENV) build *.egg-info
