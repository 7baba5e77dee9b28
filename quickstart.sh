#!/usr/bin/env bash
# Quick start, offline: install, get Fashion-MNIST from Debian's package where possible,
# train resnet20_1w1a with ReSTE for a few epochs, export the LCE .tflite and evaluate it.
# Usage: bash quickstart.sh [extra train.cifar flags, e.g. --epochs 5]
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q -r requirements.txt
pip install -q --no-deps -e .

data=/usr/share/datasets/fashion-mnist
if [ ! -d "$data" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST not found in $data: run 'sudo apt-get install dataset-fashion-mnist'" >&2
    echo "or put the four idx .gz files in a folder and pass --data-dir FOLDER" >&2
    exit 1
  fi
fi

run="quickstart_$(date +%Y%m%d_%H%M%S)"
python -m train.cifar --dataset fashion_mnist --quantizer reste --epochs 3 --warmup 1 \
  --results-dir results --name "$run" --no-download "$@"
echo "outputs in results/$run/: model.tflite, metrics.json, history.csv, checkpoint/, logs/"
