#!/usr/bin/env bash
# The main job on a real example: fine-tune all-MiniLM-L6-v2 on three real text tasks, fold the
# checkpoints in with every method through the foldin CLI, and score the merged models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
