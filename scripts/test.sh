#!/usr/bin/env bash
# Install with test extras, lint, and run the whole suite (CPU only; GPU tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pip install -q -e ".[grammar,test]"
python -m ruff check .
python -m pytest -q
