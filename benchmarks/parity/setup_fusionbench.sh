#!/usr/bin/env bash
# Create the FusionBench 0.2.33 virtualenv used as the parity and speed anchor.
set -euo pipefail
venv=${1:-"$(dirname "$0")/../_work/fusionbench-venv"}
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q fusion-bench==0.2.33 "transformers<5" "datasets<4" "peft<0.18"
