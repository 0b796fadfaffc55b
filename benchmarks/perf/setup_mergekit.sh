#!/usr/bin/env bash
# Create the mergekit 0.1.5 virtualenv used as the task-arithmetic anchor (torch pinned to the CPU wheel).
set -euo pipefail
venv=${1:-"$(dirname "$0")/../_work/mergekit-venv"}
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q mergekit==0.1.5
