# forking_trl: `make demo` (offline demo on a tiny model) and `make test` work on a fresh machine.
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test bench

install: .installed

# torch is installed first, pinned, only where it is missing (a bare `torch` requirement can pull a CUDA build)
.installed: setup.cfg pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch .installed

demo: .installed
	$(PYTHON) examples/demo.py --output_dir outputs/demo

test: .installed
	$(PYTHON) -m pytest -q tests

bench: .installed
	$(PYTHON) benchmarks/bench_selection.py
	$(PYTHON) benchmarks/bench_entropy.py
	$(PYTHON) benchmarks/bench_step.py
