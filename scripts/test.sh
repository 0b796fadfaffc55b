#!/usr/bin/env bash
# The test command: set up (if needed), lint, format and type checks, then the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check --quiet src tests benchmarks
.venv/bin/mypy --no-error-summary
exec .venv/bin/python -m pytest -q -rs -m "not slow" "$@"
