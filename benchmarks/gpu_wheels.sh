#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index (Python 3.12, x86-64), holding torch, accelerate and peft
# but not what forking_trl adds: run here, carry the folder there, then
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site <folder>/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   python3 benchmarks/gpu_check.py --output-dir <out>
# Versions are the ones installed in this environment (what the suite tested). deepspeed has only a source archive on
# the index: it is built here as a pure-Python wheel. Extra packages: EXTRA="pyarrow==24.0.0" bash benchmarks/gpu_wheels.sh
#   usage: bash benchmarks/gpu_wheels.sh [folder, default .whl]
set -euo pipefail
out="${1:-.whl}"
py="${PYTHON:-python3}"
mkdir -p "$out"
packages=(trl datasets dill multiprocess math-verify latex2sympy2_extended antlr4-python3-runtime transformers
          huggingface_hub httpx2 httpcore2 truststore kernels tomlkit click regex fsspec
          hjson pydantic pydantic_core annotated-types typing-inspection submitit psutil)
pins=$("$py" - "${packages[@]}" <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# shellcheck disable=SC2086
"$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$out" $pins ${EXTRA:-}
deepspeed=$("$py" -c 'from importlib.metadata import version; print(version("deepspeed"))')
"$py" -m pip wheel --no-deps --no-build-isolation -w "$out" "deepspeed==$deepspeed"
du -sh "$out"
