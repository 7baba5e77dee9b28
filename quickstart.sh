#!/usr/bin/env bash
# Quick start, offline: install the stack into .venv, get Fashion-MNIST from Debian's
# package where possible, train resnet20_1w1a with ReSTE for 3 epochs, export the LCE
# .tflite and evaluate it. Only the installs need the package index (PyPI, Debian).
# Usage: bash quickstart.sh [extra train.cifar flags, e.g. --epochs 5]
#        PYTHON=/path/to/python3.12 bash quickstart.sh   # choose the interpreter
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)

python=$(bash scripts/find_python.sh)
if [ -x .venv/bin/python ] && ! PYTHON=.venv/bin/python bash scripts/find_python.sh >/dev/null 2>&1; then
  echo "== .venv holds an unsupported Python: making it again"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "== Making .venv with $("$python" --version 2>&1) ($python)"
  "$python" -m venv .venv
fi
. .venv/bin/activate

echo "== Installing the stack into .venv (requirements.txt: TensorFlow 2.19, tf-keras, Larq, LCE;"
echo "   about 1.5 GB and a few minutes the first time, seconds after that)"
pip install --disable-pip-version-check -r requirements.txt | { grep -v '^Requirement already satisfied' || true; }
pip install --disable-pip-version-check -q --no-deps -e .
python -c 'import reste_larq, tensorflow as tf, larq_compute_engine as lce; print("   installed: TensorFlow", tf.__version__, "with", tf.keras.Model.__module__.split(".")[0], "as tf.keras; LCE", lce.__version__)'

data=/usr/share/datasets/fashion-mnist
if [ ! -d "$data" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== Installing Fashion-MNIST from Debian's package dataset-fashion-mnist (apt-get)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST not found in $data: run 'sudo apt-get install dataset-fashion-mnist'" >&2
    echo "or put the four idx .gz files in a folder and pass --data-dir FOLDER" >&2
    exit 1
  fi
fi

# g++ builds reste_larq's native CPU kernels on first use (reste_larq/native): without
# it training works, with the slower XLA kernels and a warning saying so.
if ! command -v g++ >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== Installing g++ (apt-get) for reste_larq's native kernels"
  apt-get update -qq && apt-get install -y -qq g++ >/dev/null \
    || echo "   could not install g++: training will use the XLA kernels"
fi

run="quickstart_$(date +%Y%m%d_%H%M%S)"
echo "== Training resnet20_1w1a with ReSTE on Fashion-MNIST ($data), then export and evaluate"
python -m train.cifar --dataset fashion_mnist --quantizer reste --epochs 3 --warmup 1 \
  --results-dir results --name "$run" --no-download "$@"
echo "== Done in $(( $(date +%s) - start )) s. Outputs in results/$run/:"
echo "   model.tflite, metrics.json, history.csv, checkpoint/, logs/"
