#!/usr/bin/env bash
# Checks that the dependency floors in pyproject.toml hold: a separate venv (no system site-packages) with the
# oldest transformers allowed, and a fast subset of the tests (a few minutes on 2 cores).
# Usage: scripts/test_floors.sh [VENV]   (default .venv-floors; reused when it exists)
# torch: FLOOR_TORCH (default 2.13.0, the CPU build scripts/setup.sh pins: PyPI's Linux wheels of older torch are
# CUDA builds of several GB). Where a CPU wheel of the floor itself can be installed, run with FLOOR_TORCH=2.6.0
# and PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-floors}
PY=${PYTHON:-python3}
floor() { sed -n "s/^ *\"$1>=\([0-9.]*\)\",*$/\1/p" pyproject.toml; }
TRANSFORMERS=$(floor transformers)
TORCH=${FLOOR_TORCH:-2.13.0}
[ -n "$TRANSFORMERS" ] || { echo "test_floors: no transformers>=X in pyproject.toml" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$TORCH" "transformers==$TRANSFORMERS" numpy safetensors tqdm pyyaml matplotlib pytest
"$VENV/bin/python" -c "import torch, transformers; print('floors: torch', torch.__version__, 'transformers', transformers.__version__)"
# what touches transformers and torch's APIs (config, save/load, generate, Mamba-2 import, cache, checkpoints);
# the model's causality grid is left to the main run
PYTHONPATH=$PWD "$VENV/bin/python" -m pytest -q -x -p no:cacheprovider -k "not test_causal" \
    tests/model/test_model.py tests/model/test_mamba2_import.py tests/model/test_single_file.py \
    tests/inference/test_inference.py tests/train/test_train_checkpoint.py tests/data/test_data_token_files.py
