#!/usr/bin/env bash
# The test command: set up (if needed) and run the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
