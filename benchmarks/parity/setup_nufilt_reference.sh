#!/usr/bin/env bash
# Install the NUFILT authors' code (FusionBench fork zihuanqiu/NUFILT) into the FusionBench 0.2.33
# virtualenv, for the parity run. The fork cannot be pip-installed; put copies of its two files in
# REF_DIR first:
#   REF_DIR/nufilt.py       <- fusion_bench/method/nufilt/nufilt.py
#   REF_DIR/filter_lora.py  <- fusion_bench/models/filter_lora.py
# Its fusion_bench/method/nufilt/utils.py (svd, is_leaf_module) is not public; the names it imports
# are FusionBench 0.2.33's own (method/opcm/utils.svd, models/utils.is_leaf_module), which this
# writes in its place.
set -euo pipefail
ref=${1:?usage: setup_nufilt_reference.sh REF_DIR [VENV]}
venv=${2:-"$(dirname "$0")/../_work/fusionbench-venv"}
pkg=$("$venv/bin/python" -c "import fusion_bench, os; print(os.path.dirname(fusion_bench.__file__))")
mkdir -p "$pkg/method/nufilt"
cp "$ref/nufilt.py" "$pkg/method/nufilt/nufilt.py"
cp "$ref/filter_lora.py" "$pkg/models/filter_lora.py"
printf '%s\n' "from fusion_bench.method.opcm.utils import svd  # noqa: F401" \
  "from fusion_bench.models.utils import is_leaf_module  # noqa: F401" > "$pkg/method/nufilt/utils.py"
: > "$pkg/method/nufilt/__init__.py"
echo "NUFILT reference installed in $pkg/method/nufilt"
